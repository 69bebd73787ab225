"""Chunk-parallel form of the family transition (derivation: README.md, 'Chunked form').

Inside a chunk of C tokens every interaction is a [C, C] matrix product; only the state crosses chunk
boundaries. Decays enter only as ``exp(G_r - G_i)`` with ``r >= i`` (log-decays summed over a stretch
of the chunk), so every exponent is <= 0 and nothing overflows however long the sequence is.

Dim legend: b batch, h heads, n chunks, c / r / i positions in a chunk, k key dim, v value dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .transition import Transition


def _floor(dtype: torch.dtype) -> float:
    """log of the smallest normal number of ``dtype``."""
    return math.log(torch.finfo(dtype).tiny)


def _exp(x: Tensor) -> Tensor:
    """``exp(x)`` for ``x <= 0``, with results below the smallest normal number flushed to exactly 0.

    Strong decays make most pairwise factors underflow; subnormal arithmetic is ~100x slower on x86
    CPUs, and those factors are below the dtype's resolution of any sum they enter.
    """
    return torch.exp(F.threshold(x, _floor(x.dtype), float("-inf")))  # one pass: x if x > floor else -inf


def _clamped_exp_(x: Tensor) -> Tensor:
    """``_exp(min(x, 0))`` computed in place on a fresh tensor ``x`` (autograd allows it: nothing has
    saved ``x``). The [.., C, C] and [.., c, c, Dk] decay factors are large: every buffer saved is a
    pass over memory and, on CPU, a round of page faults for a fresh allocation."""
    x.clamp_(max=0.0)
    return F.threshold(x, _floor(x.dtype), float("-inf"), inplace=True).exp_()


_SUB = 16  # sub-block of the per-channel decay products (see _decayed_products)


def _decayed_products(x: Tensor, gx: Tensor, y: Tensor, gy: Tensor, mask: Tensor) -> Tensor:
    """``M[r, i] = sum_d x[r, d] y[i, d] exp(gx[r, d] - gy[i, d])`` where ``mask[r, i]``, else 0.

    x, y [..., C, Dk]; gx, gy [..., C, 1] (scalar decay), [..., C, Dk], or None (no decay); mask
    [C, C] bool and lower-triangular; ``gy`` non-increasing in the position and ``gx[r] <= gy[i]``
    for ``i < r`` (log-decays summed from the chunk start). Returns [..., C, C].
    """
    if gx is None or gx.shape[-1] == 1:
        # a multiplication by the mask as numbers costs a fraction of a boolean fill over [..., C, C];
        # the product is fresh and saved by nothing, so it is masked in place
        products = (x @ y.transpose(-1, -2)).mul_(mask.to(x.dtype))
        if gx is None:
            return products
        # above the diagonal the exponents are > 0: clamped to 0 (exp = 1) where the mask zeroed
        decay = _clamped_exp_(gx - gy.transpose(-1, -2))  # [..., C, C]
        # out of place in every grad mode (one form of the computation): autograd needs the products
        return products * decay
    C = x.shape[-2]
    c = _SUB if C % _SUB == 0 and C > _SUB else C
    nb = C // c
    # per-channel decays cannot be pulled out of the sum with one reference point without exp(+G)
    # (overflow); inside a sub-block of c tokens the [c, c, Dk] decay tensor is formed explicitly
    xb, gxb, yb, gyb = (t.unflatten(-2, (nb, c)) for t in (x, gx, y, gy))  # [..., nb, c, D]
    diag_mask = mask.view(nb, c, nb, c).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [nb, c, c]
    # pairs above the diagonal have exponents > 0: clamped to 0 (finite), zeroed after the sum
    decay = _clamped_exp_(gxb.unsqueeze(-2) - gyb.unsqueeze(-3))  # [..., nb, c(r), c(i), Dk]
    # sum_d y[i, d] decay[r, i, d] x[r, d]: one matrix-vector product per (sub-block, r)
    diag = ((decay * yb.unsqueeze(-3)) @ xb.unsqueeze(-1)).squeeze(-1)  # [..., nb, c, c]
    diag = diag * diag_mask.to(x.dtype)
    block_eye = torch.eye(nb, dtype=x.dtype, device=x.device)[:, None, :, None]
    M = (diag.unsqueeze(-2) * block_eye).reshape(*x.shape[:-2], C, C)
    if nb == 1:
        return M
    # a later row block r > I and a column block I factor through the log-decay at the end of I,
    # ref_I: both exp(gx_r - ref_I) and exp(ref_I - gy_i) have exponents <= 0
    ref = gyb[..., -1:, :]  # [..., nb, 1, Dk]
    y_scaled = yb * _exp(ref - gyb)  # [..., nb, c, Dk]
    later = torch.arange(C, device=x.device)[None, :] >= (torch.arange(nb, device=x.device)[:, None] + 1) * c
    x_exp = (gx.unsqueeze(-3) - ref).masked_fill(~later[..., None], float("-inf"))  # [..., nb, C, Dk]
    x_scaled = x.unsqueeze(-3) * _exp(x_exp)
    off = x_scaled @ y_scaled.transpose(-1, -2)  # [..., nb(I), C, c]
    return M + off.movedim(-3, -2).reshape(*x.shape[:-2], C, C)


def _fold_columns(q: Tensor, tr: Transition, initial_state: Tensor, chunk_size: int) -> tuple[Tensor, Tensor]:
    """A per-value-column correction factor (Longhorn's vector step size) decouples the value
    columns: column j is its own delta rule with Dv = 1. Fold the columns into the head axis."""
    B, H, T, Dk = q.shape
    Dv = tr.value.shape[-1]

    def per_column(x: Tensor | None) -> Tensor | None:  # [B, H, T, D] -> [B, H * Dv, T, D]
        if x is None:
            return None
        return x.unsqueeze(2).expand(B, H, Dv, *x.shape[2:]).reshape(B, H * Dv, *x.shape[2:])

    remove = tr.remove.unsqueeze(2) * tr.col.permute(0, 1, 3, 2).unsqueeze(-1)  # [B, H, Dv, T, Dk]
    folded = Transition(
        log_decay=per_column(tr.log_decay),
        write=per_column(tr.write),
        value=tr.value.permute(0, 1, 3, 2).reshape(B, H * Dv, T, 1),
        remove=remove.reshape(B, H * Dv, T, Dk),
        read=per_column(tr.read),
    )
    state = initial_state.permute(0, 1, 3, 2).reshape(B, H * Dv, Dk, 1)
    o, S = chunk_transition(per_column(q), folded, state, chunk_size)
    o = o.reshape(B, H, Dv, T).permute(0, 1, 3, 2)  # [B, H, T, Dv]
    S = S.reshape(B, H, Dv, Dk).permute(0, 1, 3, 2)  # [B, H, Dk, Dv]
    return o, S


_INVERSE_BLOCK = 16  # blocks at most this size are inverted by one triangular solve (see below)


def unit_lower_inverse(L: Tensor) -> Tensor:
    """``(I + L)^{-1}`` for strictly lower-triangular ``L`` [..., C, C] (entries on and above the
    diagonal are ignored). Returns [..., C, C], unit lower-triangular.

    Recursive halving: with ``I + L = [[A, 0], [X, D]]`` the inverse is
    ``[[A^-1, 0], [-D^-1 X A^-1, D^-1]]``. On CPU a batched triangular solve of a [64, 64] system is
    ~3x slower than this (its per-matrix cost dominates; two batched matmuls per level do not), so only
    blocks of at most 16 go to ``solve_triangular`` (a stable forward substitution), all in one call.
    """
    C = L.shape[-1]
    if C <= _INVERSE_BLOCK:
        eye = torch.eye(C, dtype=L.dtype, device=L.device)
        # unitriangular: the solver reads only the strictly lower part of L
        return torch.linalg.solve_triangular(L, eye.expand_as(L), upper=False, left=False, unitriangular=True)
    h = C // 2
    top, bottom = L[..., :h, :h], L[..., h:, h:]
    if C % 2 == 0:  # both diagonal blocks in one batch
        top_inv, bottom_inv = unit_lower_inverse(torch.stack([top, bottom])).unbind(0)
    else:
        top_inv, bottom_inv = unit_lower_inverse(top), unit_lower_inverse(bottom)
    corner = -(bottom_inv @ (L[..., h:, :h] @ top_inv))
    upper_right = top_inv.new_zeros(*top_inv.shape[:-1], C - h)
    return torch.cat([torch.cat([top_inv, upper_right], -1), torch.cat([corner, bottom_inv], -1)], -2)


def _solve_chunks(L: Tensor, R: Tensor, X: Tensor) -> tuple[Tensor, Tensor]:
    """``(I + L)^{-1} R`` and ``(I + L)^{-1} X`` for every chunk, from one product with ``[R, X]``.

    L [..., C, C] strictly lower-triangular; R [..., C, Dk]; X [..., C, Dv]. The inverse and the
    concatenation live only here, so without autograd their memory is free again for the scan.
    """
    WX = unit_lower_inverse(L) @ torch.cat([R, X], dim=-1)  # [..., C, Dk + Dv]
    # split, not two slices: its backward concatenates once instead of zero-filling twice
    return WX.split([R.shape[-1], X.shape[-1]], dim=-1)


def _per_chunk(x: Tensor | None) -> tuple[Tensor, ...] | None:
    """[B, H, N, ...] -> N views [B * H, ...] (strided: bmm reads them in place, no chunk-major copy).

    ``unbind``, not ``x[:, n]`` in the loop: the backward of one ``unbind`` stacks the N gradients
    once, while each of N selects would scatter into its own zero-filled full-size buffer (N^2 work).
    """
    return None if x is None else x.flatten(0, 1).unbind(1)


def _scan_states(
    S0: Tensor, W: Tensor, Y0: Tensor, K: Tensor, decay: Tensor | None, c: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """The sequential part of the delta rows, one chunk n at a time:

        Y_n = Y0_n - W_n S_n,   S_{n+1} = decay_n * S_n + c_n + K_n^T Y_n

    Two [C, Dk] x [Dk, Dv]-sized products per chunk; the rest of the output is formed afterwards for
    all chunks at once. W, K [B, H, N, C, Dk]; Y0 [B, H, N, C, Dv]; decay [B, H, N, Dg, 1] (Dg 1 or
    Dk) or None; c [B, H, N, Dk, Dv] or None; S0 [B, H, Dk, Dv].

    Returns the chunks' initial states [B, H, N, Dk, Dv], Y [B, H, N, C, Dv] and the final state.
    """
    B, H, N = W.shape[:3]

    W, Y0, K, decay, c = (_per_chunk(x) for x in (W, Y0, K, decay, c))
    S = S0.flatten(0, 1)
    starts, Y = [], []
    for n in range(N):
        starts.append(S)
        Y.append(torch.baddbmm(Y0[n], W[n], S, alpha=-1.0))
        carried = S if decay is None else decay[n] * S
        if c is not None:
            carried = carried + c[n]
        S = torch.baddbmm(carried, K[n].transpose(-1, -2), Y[n])

    def per_head(xs: list[Tensor]) -> Tensor:  # N x [B * H, ...] -> [B, H, N, ...]
        return torch.stack(xs, dim=1).unflatten(0, (B, H))

    return per_head(starts), per_head(Y), S.unflatten(0, (B, H))


def _matmul_add(x: Tensor, y: Tensor, base: Tensor) -> Tensor:
    """``base + x @ y`` for [..., m, k] x [..., k, n], accumulated into ``base``: callers hand over a
    fresh product that nothing else holds (autograd saves the operands of a matmul, not its result),
    so no new output buffer is needed."""
    if not base.is_contiguous():  # flatten would copy, and the sum would land in the copy
        return torch.baddbmm(base.flatten(0, -3), x.flatten(0, -3), y.flatten(0, -3)).view(base.shape)
    base.flatten(0, -3).baddbmm_(x.flatten(0, -3), y.flatten(0, -3))
    return base


def chunk_transition(
    q: Tensor, tr: Transition, initial_state: Tensor, chunk_size: int = 64
) -> tuple[Tensor, Tensor]:
    """Chunk-parallel ``S_t = exp(g_t) S_{t-1} - remove_t read_t^T S_{t-1} + write_t value_t^T``.

    Additive rules (``tr.remove is None``) are decay-weighted chunked linear attention. Delta rules
    solve, per chunk, the unit lower-triangular system ``(I + L) E = R S_0 + L_w V`` for the
    predictions ``E`` (the UT transform; its solution ``E = W S_0 + U`` is the WY representation).

    Args:
        q: queries, already scaled, [B, H, T, Dk].
        tr: the per-token transition (see ``Transition``).
        initial_state: S_0 [B, H, Dk, Dv].
        chunk_size: tokens per chunk C; T need not be a multiple of it.

    Returns:
        o [B, H, T, Dv] and the final state S_T [B, H, Dk, Dv].
    """
    if tr.col is not None:
        return _fold_columns(q, tr, initial_state, chunk_size)
    B, H, T, Dk = q.shape
    C = chunk_size
    N = -(-T // C)
    pad = N * C - T

    def chunked(x: Tensor | None) -> Tensor | None:  # [B, H, T, D] -> [B, H, N, C, D]
        if x is None:
            return None
        # padded tokens write nothing and do not decay, so the final state is unchanged
        return (F.pad(x, (0, 0, 0, pad)) if pad else x).reshape(B, H, N, C, x.shape[-1])

    qs, ws, vs, rms, rds, gs = map(chunked, (q, tr.write, tr.value, tr.remove, tr.read, tr.log_decay))
    if gs is not None:
        G = gs.cumsum(dim=-2)  # [B, H, N, C, Dg] log-decay from the chunk start through token r
        G_before = G - gs  # through token r - 1
        G_last = G[..., -1:, :]  # [B, H, N, 1, Dg]
        to_end = lambda x, g=G: x * _exp(G_last - g)  # noqa: E731
        from_start = lambda x, g: x * _exp(g)  # noqa: E731
    else:
        G = G_before = None
        to_end = lambda x, g=None: x  # noqa: E731
        from_start = lambda x, g: x  # noqa: E731
    inclusive = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    strict = inclusive.tril(-1)

    # everything that does not depend on the incoming state, for all chunks at once
    P_qw = _decayed_products(qs, G, ws, G, inclusive)  # [B, H, N, C, C]
    write_to_end = to_end(ws).transpose(-1, -2)  # [B, H, N, Dk, C]
    d = None if gs is None else _exp(G_last).transpose(-1, -2)  # [B, H, N, Dg, 1]
    A = lambda: from_start(qs, G)  # noqa: E731  [B, H, N, C, Dk], o_n = A_n S_n + ...: formed late
    if rms is None:
        starts, S = _additive_scan(initial_state, d, write_to_end @ vs)
        o = _matmul_add(A(), starts, P_qw @ vs)
    else:
        # predictions e_r = read_r^T S_{r-1}: (I + L_rr) E = (read * exp(G_before)) S_n + L_rw V
        same = tr.remove is tr.write  # DeltaNet, GDN, KDA: remove and write along the same key
        L_rw = _decayed_products(rds, G_before, ws, G, strict)  # [B, H, N, C, C]
        if same:
            # (I + L)^{-1} L = I - (I + L)^{-1}, so V - E = (I + L)^{-1} V - W S_n: the new values
            # that o and the next state read, with no product L V
            W, Y0 = _solve_chunks(L_rw, from_start(rds, G_before), vs)
            c = None
        else:
            # Y = -E = -U - W S_n; the written values enter through c and P_qw V
            L_rr = _decayed_products(rds, G_before, rms, G, strict)
            W, Y0 = _solve_chunks(L_rr, from_start(rds, G_before), -(L_rw @ vs))
            c = write_to_end @ vs
            del L_rr
        # without autograd nothing else holds these: the scan reuses their memory (the CPU allocator
        # may hand memory freed at the end of a call back to the OS, and touching it again costs)
        del L_rw
        K = write_to_end if same else to_end(rms).transpose(-1, -2)  # [B, H, N, Dk, C]
        starts, Y, S = _scan_states(initial_state, W, Y0, K.transpose(-1, -2), d, c)
        if same:
            o = _matmul_add(P_qw, Y, A() @ starts)  # o = A S_n + P (V - E)
        else:
            P_qr = _decayed_products(qs, G, rms, G, inclusive)
            o = _matmul_add(P_qr, Y, _matmul_add(P_qw, vs, A() @ starts))  # A S_n + P_qw V - P_qr E
    o = o.reshape(B, H, N * C, -1)
    return (o[:, :, :T] if pad else o), S  # a no-op slice would still cost a zero-filled backward


def _additive_scan(S0: Tensor, decay: Tensor | None, c: Tensor) -> tuple[Tensor, Tensor]:
    """``S_{n+1} = decay_n * S_n + c_n`` chunk by chunk. decay [B, H, N, Dg, 1] or None; c [B, H, N,
    Dk, Dv]; S0 [B, H, Dk, Dv]. Returns the chunks' initial states [B, H, N, Dk, Dv] and S_N."""
    B, H = S0.shape[:2]
    decay, c = _per_chunk(decay), _per_chunk(c)
    starts = []
    S = S0.flatten(0, 1)
    for n in range(len(c)):
        starts.append(S)
        S = (S if decay is None else decay[n] * S) + c[n]
    return torch.stack(starts, dim=1).unflatten(0, (B, H)), S.unflatten(0, (B, H))
