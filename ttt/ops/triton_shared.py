"""The Triton code shared by the TTT-Linear and TTT-MLP kernels, in one module (imported only by the
Triton forms: it needs Triton).

- Dot precision (``PREC``): how the tensor-core dots see their operands. Every dot accumulates in fp32 and
  the fast weights stay fp32 in registers; what varies is the precision the operands are rounded to:
  ``"ieee"`` (exact fp32 dots, fp32 inputs), ``"tf32"``, or ``"bf16"`` / ``"fp16"`` (operands cast to the
  input dtype, as flash-linear-attention and FlashAttention do). ``TTT_TRITON_DOTS`` (read at every
  launch) picks the mode for bf16 / fp16 inputs: ``auto`` (default: bf16 -> bf16 dots, fp16 -> tf32,
  because the backward's gradient tiles could overflow fp16), ``input`` or ``tf32``. Speed and accuracy
  of the modes: docs/kernels.md.
- LayerNorm rows (``_ln_rows``, ``_ln_rows_bwd``, ``_ln_l2_grad``, ``_ln_l2_grad_bwd``): rows are tokens,
  columns the D valid entries of a [BT, BD] tile (BD >= D, padding masked by ``m_d`` / ``m_td``). With
  ``xh = LN(z)`` without affine and ``rstd = 1 / sqrt(var(z) + eps)``: ``_ln_rows`` gives (xh, rstd);
  ``_ln_rows_bwd`` applies the LayerNorm Jacobian, ``dz = (dx - mean(dx) - xh mean(dx xh)) rstd``;
  ``_ln_l2_grad`` is the inner gradient of TTT, ``G = d/dz 0.5 ||LN(z) gamma + beta - tgt||^2``, and
  ``_ln_l2_grad_bwd`` its second-order backward (derived in ``ttt/ops/ttt_linear/README.md``, "Backward",
  and ``ttt/ops/ttt_mlp/triton/README.md``).
- Segments: a call's tokens on the grid ``u = offset + t`` cut at multiples of the mini-batch size
  (``_span``, ``_segment_masks``, ``_segment_rows``, ``varlen_plan``), per-head LN parameters and
  ``token_eta`` (``_head_params``), and the dtype of the per-segment checkpoints.
- Decode: the one-row LayerNorm helpers of the decode kernels, their input check, and the Python glue
  that runs a decode kernel as an inference-only form (``decode_through``) or turns a chunk kernel's
  anchor and gradient sum into a ``TTTState`` (``state_after``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .types import TTTInputs, TTTState

MODES = ("auto", "input", "tf32")


def dot_precision(dtype: torch.dtype, mode: str | None = None) -> str:
    """The ``PREC`` constexpr of the kernels for inputs of ``dtype`` (``mode``: default
    ``$TTT_TRITON_DOTS`` or ``"auto"``)."""
    if dtype in (torch.float32, torch.float64):
        return "ieee"
    mode = mode or os.environ.get("TTT_TRITON_DOTS") or "auto"
    if mode not in MODES:
        raise ValueError(f"TTT_TRITON_DOTS must be one of {MODES}, got {mode!r}")
    if mode == "tf32" or (mode == "auto" and dtype == torch.float16):
        return "tf32"
    return "bf16" if dtype == torch.bfloat16 else "fp16"


@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    """a @ b with fp32 accumulation, operands rounded as ``PREC`` says (see the module text)."""
    if PREC == "bf16":
        c = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    elif PREC == "fp16":
        c = tl.dot(a.to(tl.float16), b.to(tl.float16))
    else:
        c = tl.dot(a, b, input_precision=PREC)
    return c


@triton.jit
def _ln_rows(z, m_d, D: tl.constexpr, eps):
    """Row LayerNorm statistics of z [BT, BD] over the D valid columns: (xhat, rstd [BT])."""
    mu = tl.sum(z, axis=1) / D
    zc = tl.where(m_d[None, :], z - mu[:, None], 0.0)
    var = tl.sum(zc * zc, axis=1) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    return zc * rstd[:, None], rstd


@triton.jit
def _ln_rows_bwd(b_dx, b_xh, b_rstd, D: tl.constexpr):
    """dz = (dx - mean(dx) - xh * mean(dx * xh)) * rstd per row: the gradient through x = LN(z). [BT, BD]"""
    b_mean = tl.sum(b_dx, axis=1)[:, None] / D
    b_proj = (tl.sum(b_dx * b_xh, axis=1) / D)[:, None]
    return (b_dx - b_mean - b_xh * b_proj) * b_rstd[:, None]


@triton.jit
def _ln_l2_grad(b_z, b_tgt, b_gamma, b_beta, m_td, m_d, D: tl.constexpr, eps):
    """G = d/dZ 0.5 ||LN(Z) - tgt||^2 per row of Z [BT, BD] and what its backward needs: (G, xhat, rstd,
    gx = (LN(Z) - tgt) * gamma, m2 = mean(gx * xhat)); rows and columns outside ``m_td`` are zero."""
    b_xh, b_rstd = _ln_rows(b_z, m_d, D, eps)
    b_gx = (b_xh * b_gamma[None, :] + b_beta[None, :] - b_tgt) * b_gamma[None, :]
    b_m2 = tl.sum(b_gx * b_xh, axis=1) / D
    b_g = (b_gx - tl.sum(b_gx, axis=1)[:, None] / D - b_xh * b_m2[:, None]) * b_rstd[:, None]
    return tl.where(m_td, b_g, 0.0), b_xh, b_rstd, b_gx, b_m2


@triton.jit
def _ln_l2_grad_bwd(b_dg, b_g, b_xh, b_rstd, b_gx, b_m2, b_tgt, b_gamma, b_beta, m_td, D: tl.constexpr):
    """Second-order backward of ``_ln_l2_grad``: dG [BT, BD] -> (dZ, d tgt, d gamma, d beta) (the last two
    summed over rows). G = (gx - mean gx - xh mean(gx xh)) rstd, gx = (xh gamma + beta - tgt) gamma."""
    b_dg = tl.where(m_td, b_dg, 0.0)
    b_mdx = tl.sum(b_dg * b_xh, axis=1) / D
    # gradient w.r.t. gx
    b_gdx = (b_dg - tl.sum(b_dg, axis=1)[:, None] / D - b_xh * b_mdx[:, None]) * b_rstd[:, None]
    b_gdx = tl.where(m_td, b_gdx, 0.0)
    # gradient w.r.t. xhat (through G directly and through gx) and rstd
    b_gxh = -(b_m2[:, None] * b_dg + b_mdx[:, None] * b_gx) * b_rstd[:, None]
    b_gxh += b_gdx * b_gamma[None, :] * b_gamma[None, :]
    b_grstd = tl.sum(b_dg * b_g, axis=1) / b_rstd
    b_dgamma = tl.sum(b_gdx * (2.0 * b_gamma[None, :] * b_xh + b_beta[None, :] - b_tgt), axis=0)
    b_dbeta = tl.sum(b_gdx * b_gamma[None, :], axis=0)
    b_dtgt = -b_gdx * b_gamma[None, :]
    b_dz = _ln_rows_bwd(b_gxh, b_xh, b_rstd, D) - (b_grstd * b_rstd * b_rstd / D)[:, None] * b_xh
    return tl.where(m_td, b_dz, 0.0), b_dtgt, b_dgamma, b_dbeta


@triton.jit
def _head_params(ln_w, ln_b, te, i_h, o_d, m_d, o_i, D: tl.constexpr, MB: tl.constexpr):
    """Head i_h's inner LayerNorm (gamma, beta [BD]) and the mini-batch's token_eta (row i's te [BT],
    te[b-1]), in fp32: what every kernel loads first."""
    b_gamma = tl.load(ln_w + i_h * D + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_beta = tl.load(ln_b + i_h * D + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_te = tl.load(te + o_i, mask=o_i < MB, other=0.0).to(tl.float32)
    return b_gamma, b_beta, b_te, tl.load(te + MB - 1).to(tl.float32)


@triton.jit
def _segment_masks(n, o_i, offset, T, te, b_te, MB: tl.constexpr, BT: tl.constexpr, CAUSAL: tl.constexpr):
    """Rows of segment n: token index, validity, eta per row, the [BT, BT] mask, last position, done flag."""
    # grid slot of row i is n * MB + i; token index t = slot - offset
    o_t = n * MB + o_i - offset
    m_t = (o_i < MB) & (o_t >= 0) & (o_t < T)
    # position of the last token of this segment inside its mini-batch
    slot_end = tl.minimum(n * MB + MB, offset + T)
    p_last = slot_end - 1 - n * MB
    f_done = (slot_end == n * MB + MB).to(tl.float32)
    if CAUSAL:
        b_eta = b_te
        m_a = (o_i[:, None] >= o_i[None, :]) & m_t[None, :]
    else:
        # clamped: a segment past the end of a short packed sequence has no last token
        b_eta = tl.zeros([BT], dtype=tl.float32) + tl.load(te + tl.maximum(p_last, 0)).to(tl.float32)
        m_a = (o_i[:, None] >= 0) & m_t[None, :]
    return o_t, m_t, b_eta, m_a, p_last, f_done


@triton.jit
def _segment_rows(q, k, v, lr, tok0, o_t, m_t, o_d, m_d, D: tl.constexpr):
    """The rows of one segment: token pointers [BT, BD] (tokens o_t of the sequence at tok0), their mask,
    q, k, v in fp32 (zero outside the mask) and lr [BT]."""
    p_tok = tok0 * D + o_t[:, None] * D + o_d[None, :]
    m_td = m_t[:, None] & m_d[None, :]
    b_q = tl.load(q + p_tok, mask=m_td, other=0.0).to(tl.float32)
    b_k = tl.load(k + p_tok, mask=m_td, other=0.0).to(tl.float32)
    b_v = tl.load(v + p_tok, mask=m_td, other=0.0).to(tl.float32)
    b_lr = tl.load(lr + tok0 + o_t, mask=m_t, other=0.0).to(tl.float32)
    return p_tok, m_td, b_q, b_k, b_v, b_lr


@triton.jit
def _span(i_bh, T, NS, offset, cu_seqlens, H: tl.constexpr, MB: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Token base (int64, in tokens), length and segment count of program i_bh's sequence.

    Dense q [B, H, T, D]: sequence i_bh has T tokens at i_bh * T. Packed q [1, H, sum T_n, D] with
    ``cu_seqlens`` [N + 1]: program i_bh = n * H + h reads tokens cu[n] .. cu[n + 1] of head h.
    """
    if IS_VARLEN:
        i_n = i_bh // H
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        T_i = (tl.load(cu_seqlens + i_n + 1) - bos).to(tl.int32)
        tok0 = (i_bh % H).to(tl.int64) * T + bos
        NS_i = (offset + T_i + MB - 1) // MB
    else:
        tok0 = i_bh.to(tl.int64) * T
        T_i = T
        NS_i = NS
    return tok0, T_i, NS_i


@triton.jit
def _program(i_bh, T, NS, offset, cu_seqlens, ln_w, ln_b, te, H: tl.constexpr, D: tl.constexpr,
             BD: tl.constexpr, MB: tl.constexpr, BT: tl.constexpr, IS_VARLEN: tl.constexpr):  # fmt: skip
    """What a program of a backward kernel sets up first for its (sequence, head) ``i_bh``: its span
    (``_span``), 64-bit index, row / column offsets and mask, and the head's LN parameters and token_eta.
    Returns (tok0, T_i, NS_i, i_bh64, o_i, o_d, m_d, gamma, beta, te, te_last)."""
    tok0, T_i, NS_i = _span(i_bh, T, NS, offset, cu_seqlens, H, MB, IS_VARLEN)
    o_i = tl.arange(0, BT)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    b_gamma, b_beta, b_te, te_last = _head_params(ln_w, ln_b, te, i_bh % H, o_d, m_d, o_i, D, MB)
    return tok0, T_i, NS_i, i_bh.to(tl.int64), o_i, o_d, m_d, b_gamma, b_beta, b_te, te_last


def varlen_plan(cu_seqlens: torch.Tensor | None, offset: int, MB: int, B: int, T: int):
    """(sequences, max segments, per-sequence lengths or None) of a dense or packed call.

    Packed calls read ``cu_seqlens`` once on the host (one device sync) to size the checkpoints."""
    if cu_seqlens is None:
        return B, triton.cdiv(offset + T, MB), None
    lens = torch.diff(cu_seqlens.detach().to("cpu", torch.int64)).tolist()
    if B != 1 or not lens or min(lens) < 1 or sum(lens) != T:
        raise ValueError(
            f"cu_seqlens must split the T = {T} tokens of q [1, H, T, D] into non-empty sequences, "
            f"got batch {B} and lengths {lens}"
        )
    return len(lens), max(triton.cdiv(offset + n, MB) for n in lens), lens


def checkpoint_dtype(prec: str) -> torch.dtype:
    """dtype of the checkpointed anchors W: the dtype the dots round W to, fp32 for tf32 / ieee."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(prec, torch.float32)


def checkpoint_precision(dtype: torch.dtype, ckpt_dtype: torch.dtype) -> str:
    """The ``PREC`` of the forward that wrote checkpoints of ``ckpt_dtype`` for inputs of ``dtype``: the
    backward must round its dot operands the same way (whatever ``TTT_TRITON_DOTS`` says by then)."""
    if ckpt_dtype in (torch.bfloat16, torch.float16):
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}[ckpt_dtype]
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


@triton.jit
def _ln_vec(z, m_d, D: tl.constexpr, eps):
    """LayerNorm statistics of one row z [BD] over its D valid entries: (xhat, rstd)."""
    xh, rstd = _ln_rows(z[None, :], m_d, D, eps)
    return tl.sum(xh, axis=0), tl.sum(rstd, axis=0)


@triton.jit
def _ln_l2_grad_vec(z, tgt, gamma, beta, m_d, D: tl.constexpr, eps):
    """``_ln_l2_grad`` of one row z [BD] (padding zeroed)."""
    g, _, _, _, _ = _ln_l2_grad(z[None, :], tgt[None, :], gamma, beta, m_d[None, :], m_d, D, eps)
    return tl.sum(g, axis=0)


@triton.jit
def _decode_token(x, te, offs, off_scalar, i_bh, i_h, o_d, m_d, D: tl.constexpr, MB: tl.constexpr,
                  OFFSET_PTR: tl.constexpr):  # fmt: skip
    """What a decode program reads first: its position in the mini-batch ``off`` (per program from
    ``offs``, or the host's ``off_scalar``), ``token_eta`` there and at the end, and its token's rows.
    ``x`` = (q, k, v, lr, ln_w, ln_b) pointers. Returns (off, eta, te_last, q, k, v, lr, gamma, beta)."""
    q, k, v, lr, ln_w, ln_b = x
    if OFFSET_PTR:
        off = tl.load(offs + i_bh)
    else:
        off = off_scalar
    eta = tl.load(te + off).to(tl.float32)
    te_last = tl.load(te + MB - 1).to(tl.float32)
    p_d = i_bh.to(tl.int64) * D + o_d
    b_q = tl.load(q + p_d, mask=m_d, other=0.0).to(tl.float32)
    b_k = tl.load(k + p_d, mask=m_d, other=0.0).to(tl.float32)
    b_v = tl.load(v + p_d, mask=m_d, other=0.0).to(tl.float32)
    b_lr = tl.load(lr + i_bh).to(tl.float32)
    b_gamma = tl.load(ln_w + i_h * D + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_beta = tl.load(ln_b + i_h * D + o_d, mask=m_d, other=0.0).to(tl.float32)
    return off, eta, te_last, b_q, b_k, b_v, b_lr, b_gamma, b_beta


def check_decode(q, k, v, lr, ln_weight, ln_bias, token_eta, anchor, grad_sum, shapes, offset=None, out=None):
    """Shapes, dtypes and contiguity the decode kernels index by; errors name the expected layout.

    B, H come from ``lr`` ``[B, H]``, D from ``ln_weight`` ``[H, D]``; ``shapes``: the per-head shape of each
    state tensor, e.g. ``((D, D), (D,))``; ``offset``: the in-place forms' int32 ``[B, H]`` offsets (None
    for the functional forms' host int); ``out``: the optional output buffer."""
    B, H = lr.shape[:2]
    D = ln_weight.shape[-1]
    for name, x in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if tuple(x.shape) != (H, D) or not x.is_contiguous():
            raise ValueError(f"{name} must be a contiguous [H, D] = [{H}, {D}] tensor, got {list(x.shape)}")
    if token_eta.dim() != 1 or not token_eta.is_contiguous() or not token_eta.is_floating_point():
        raise ValueError(f"token_eta must be a contiguous float [b] tensor, got {token_eta.dtype} "
                         f"{list(token_eta.shape)}")  # fmt: skip
    if offset is not None and (
        offset.shape != (B, H) or offset.dtype != torch.int32 or not offset.is_contiguous()
    ):
        raise ValueError(f"offset must be a contiguous int32 tensor [B, H] = [{B}, {H}], got "
                         f"{offset.dtype} {list(offset.shape)}")  # fmt: skip
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.numel() != B * H * D or x.shape[:2] != (B, H) or x.shape[-1] != D or not x.is_contiguous():
            want = f"a contiguous [B, H, D] = [{B}, {H}, {D}] tensor (or [B, H, 1, D])"
            raise ValueError(f"{name} must be {want}, got {list(x.shape)}")
    if lr.numel() != B * H or not lr.is_contiguous():
        raise ValueError(f"lr must be a contiguous [B, H] = [{B}, {H}] tensor, got {list(lr.shape)}")
    if out is not None and (tuple(out.shape) != (B, H, D) or out.dtype != q.dtype or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous [B, H, D] = [{B}, {H}, {D}] {q.dtype} tensor, got "
                         f"{out.dtype} {list(out.shape)}")  # fmt: skip
    full = [(B, H, *s) for s in shapes]
    for name, ts in (("anchor", anchor), ("grad_sum", grad_sum)):
        if len(ts) != len(full) or any(
            tuple(x.shape) != s or x.dtype != torch.float32 or not x.is_contiguous() for x, s in zip(ts, full)
        ):
            raise ValueError(f"{name} must be {len(full)} contiguous float32 tensors of shapes {full}, got "
                             f"{[(list(y.shape), y.dtype) for y in ts]}")  # fmt: skip


class _InferenceOnly(torch.autograd.Function):
    """Runs ``run(*tensors)`` (a decode kernel) as one autograd node whose backward raises: the decode
    kernels have no backward, and a gradient through them must not silently come out as zero."""

    @staticmethod
    def forward(ctx, run, *tensors):
        return run(*tensors)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            "the Triton decode kernels are inference-only (no backward): to train through one-token steps "
            "use decode_impl='chunk' (layers) or call the op without decode=True"
        )


def decode_through(
    decode, x: TTTInputs, state: TTTState, *, causal: bool, eps: float
) -> tuple[Tensor, TTTState]:
    """One causal token ``[B, H, 1, D]`` through a functional decode kernel (``ttt_linear_decode`` or
    ``ttt_mlp_decode``); returns ``(o [B, H, 1, D], TTTState)`` like the chunk launchers. Inference only:
    a backward through it raises."""
    if not causal or x.q.shape[2] != 1:
        raise ValueError(
            f"a decode step is one causal token [B, H, 1, D], got causal={causal}, {list(x.q.shape)}"
        )
    f32 = lambda t: t.to(torch.float32).contiguous()  # noqa: E731
    n = len(state.anchor)

    def run(q, k, v, lr, ln_weight, ln_bias, token_eta, *fast):
        o, anchor, grad_sum, weights = decode(
            q.contiguous(), k.contiguous(), v.contiguous(), lr.contiguous(), f32(ln_weight), f32(ln_bias),
            f32(token_eta), tuple(map(f32, fast[:n])), tuple(map(f32, fast[n:])), state.offset, eps=eps,
        )  # fmt: skip
        return (o, *anchor, *grad_sum, *weights)

    out = _InferenceOnly.apply(run, *x, *state.anchor, *state.grad_sum)
    o, anchor, grad_sum, weights = out[0], out[1 : 1 + n], out[1 + n : 1 + 2 * n], out[1 + 2 * n :]
    offset = (state.offset + 1) % x.token_eta.shape[0]
    if offset == 0:  # the mini-batch completed: the token's weights are the new anchor
        weights = anchor
    return o[:, :, None], TTTState(weights, anchor, grad_sum, offset, state.mini_batch_size, state.variant)


def chunk_through(
    function, x: TTTInputs, state: TTTState, *, causal: bool, eps: float, cu_seqlens: Tensor | None
) -> tuple[Tensor, TTTState | None]:
    """A TTT call through a chunk-kernel ``torch.autograd.Function`` (``(*x, *anchor, *grad_sum, offset,
    causal, eps, cu_seqlens) -> (o, *anchor, *grad_sum)``): ``(o, TTTState after the call)``."""
    if x.q.dtype == torch.float64:
        raise TypeError("the Triton TTT kernels compute in float32; use impl='chunk' for float64 inputs")
    if x.q.shape[2] == 0:
        return x.q.clone(), state
    o, *fast = function.apply(*x, *state.anchor, *state.grad_sum, state.offset, causal, eps, cu_seqlens)
    n = len(state.anchor)
    return o, state_after(x, state, fast[:n], fast[n:], cu_seqlens)


def state_after(
    x: TTTInputs, state: TTTState, anchor: list[Tensor], grad_sum: list[Tensor], cu_seqlens: Tensor | None
) -> TTTState | None:
    """The ``TTTState`` after a chunk-kernel call from the anchor and gradient sum it returned: the offset
    moves by T (packed: by each sequence's length; None when they end at different offsets), and the
    last token's weights are ``anchor - token_eta[offset - 1] * grad_sum`` inside a mini-batch."""
    mb = x.token_eta.shape[0]
    offset = (state.offset + x.q.shape[2]) % mb
    if cu_seqlens is not None:
        ends = {(state.offset + int(n)) % mb for n in torch.diff(cu_seqlens.detach().cpu())}
        if len(ends) > 1:
            return None
        offset = ends.pop()
    anchor, grad_sum = tuple(anchor), tuple(grad_sum)
    te = x.token_eta.to(torch.float32)
    weights = anchor if offset == 0 else tuple(a - te[offset - 1] * s for a, s in zip(anchor, grad_sum))
    return TTTState(weights, anchor, grad_sum, offset, mb, state.variant)
