"""The delta rows of the family: DeltaNet, Gated DeltaNet, KDA, Longhorn, Comba, RWKV7.

Each is one step on an inner objective whose gradient has a rank-one correction term; see
``rules.py`` for the declarations and README.md for the closed forms and the chunk algorithm.
Common arguments (every op):

    q, k: [B, H, T, Dk]; v: [B, H, T, Dv]; all one floating dtype.
    scale: multiplies q. Default: ``Dk ** -0.5``.
    initial_state: S_0 [B, H, Dk, Dv]. Default: zeros.
    output_final_state: also return S_T [B, H, Dk, Dv] (float32, float64 for float64 inputs).
    impl: "chunk" (chunk-parallel, WY/UT transform) | "recurrent" (token loop, closed form) |
        "autograd" (alias "reference": token loop, update by torch.func from the objective).
    chunk_size: tokens per chunk for impl="chunk". Default: 64.

Returns ``(o [B, H, T, Dv] in q.dtype, S_T or None)``. The output reads the updated state,
``o_t = S_t^T (scale * q_t)``. Keys are normally L2-normalised by the layer: the transition
``I - beta k k^T`` expands (the state diverges) when ``beta ||k||^2 > 2``.
"""

from __future__ import annotations

from torch import Tensor

from .._checks import check_gate, check_qkv, resolve_log_decay
from ..common import compute_dtype
from .dispatch import run_rule


def _beta(
    beta: Tensor, shape: tuple[int, ...], dtype, *, name: str = "beta", high: float | None = None
) -> Tensor:
    return check_gate(name, beta, shape, dtype, low=0.0, high=high)


def deltanet(
    q: Tensor, k: Tensor, v: Tensor, *, beta: Tensor,
    scale: float | None = None, initial_state: Tensor | None = None, output_final_state: bool = False,
    impl: str = "chunk", chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """DeltaNet: online gradient descent on ``L_t = beta_t/2 ||S^T k_t - v_t||^2``,
    ``S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``.

    Args:
        beta: learning rate [B, H, T], >= 0 (beta <= 2 keeps the transition contractive for unit keys).
        (others: see the module docstring.)

    Examples::

        >>> import torch, ttt.ops.family as fam
        >>> q, k, v = torch.randn(3, 1, 2, 10, 8).unbind(0)
        >>> o, S = fam.deltanet(q, k, v, beta=torch.rand(1, 2, 10), output_final_state=True)
        >>> o.shape, S.shape
        (torch.Size([1, 2, 10, 8]), torch.Size([1, 2, 8, 8]))
    """
    B, H, T, _ = check_qkv(q, k, v, same_qk_v_dim=False)
    dt = compute_dtype(q.dtype)
    tokens = {"k": k, "v": v, "beta": _beta(beta, (B, H, T), dt)}
    return run_rule("deltanet", q, v, tokens, scale, initial_state, output_final_state, impl, chunk_size)


def gated_deltanet(
    q: Tensor, k: Tensor, v: Tensor, *, beta: Tensor, alpha: Tensor | None = None,
    log_alpha: Tensor | None = None,
    scale: float | None = None, initial_state: Tensor | None = None, output_final_state: bool = False,
    impl: str = "chunk", chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """Gated DeltaNet (GDN): SGD on the decayed state ``S~ = alpha_t S_{t-1}`` with
    ``L_t = beta_t/2 ||S~^T k_t - v_t||^2``, i.e.
    ``S_t = (I - beta_t k_t k_t^T) alpha_t S_{t-1} + beta_t k_t v_t^T``.

    Args:
        beta: learning rate [B, H, T], >= 0.
        alpha: decay [B, H, T] in (0, 1]; or instead
        log_alpha: its logarithm [B, H, T], <= 0 (fla's ``g``; preferred for strong decays).
        (others: see the module docstring.)

    Examples::

        >>> import torch, ttt.ops.family as fam
        >>> q, k, v = torch.randn(3, 1, 2, 10, 8).unbind(0)
        >>> alpha = torch.rand(1, 2, 10) * 0.98 + 0.01   # in (0, 1]
        >>> o, _ = fam.gated_deltanet(q, k, v, beta=torch.rand(1, 2, 10), alpha=alpha)
        >>> o.shape
        torch.Size([1, 2, 10, 8])
    """
    B, H, T, _ = check_qkv(q, k, v, same_qk_v_dim=False)
    dt = compute_dtype(q.dtype)
    tokens = {"k": k, "v": v, "beta": _beta(beta, (B, H, T), dt)}
    tokens["log_alpha"] = resolve_log_decay(alpha, log_alpha, (B, H, T), dt)
    return run_rule(
        "gated_deltanet", q, v, tokens, scale, initial_state, output_final_state, impl, chunk_size
    )


def kda(
    q: Tensor, k: Tensor, v: Tensor, *, beta: Tensor, alpha: Tensor | None = None,
    log_alpha: Tensor | None = None,
    scale: float | None = None, initial_state: Tensor | None = None, output_final_state: bool = False,
    impl: str = "chunk", chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """Kimi Delta Attention: GDN with a per-channel decay,
    ``S_t = (I - beta_t k_t k_t^T) Diag(alpha_t) S_{t-1} + beta_t k_t v_t^T``.

    Args:
        beta: learning rate [B, H, T], >= 0.
        alpha: per-key-channel decay [B, H, T, Dk] in (0, 1]; or instead ``log_alpha`` (<= 0).
        (others: see the module docstring.)
    """
    B, H, T, Dk = check_qkv(q, k, v, same_qk_v_dim=False)
    dt = compute_dtype(q.dtype)
    tokens = {"k": k, "v": v, "beta": _beta(beta, (B, H, T), dt)}
    tokens["log_alpha"] = resolve_log_decay(alpha, log_alpha, (B, H, T, Dk), dt)
    return run_rule("kda", q, v, tokens, scale, initial_state, output_final_state, impl, chunk_size)


def longhorn(
    q: Tensor, k: Tensor, v: Tensor, *, beta: Tensor,
    scale: float | None = None, initial_state: Tensor | None = None, output_final_state: bool = False,
    impl: str = "chunk", chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """Longhorn: the implicit (proximal) online step
    ``S_t = argmin_S 1/2 ||S - S_{t-1}||^2 + 1/2 ||S^T k_t - v_t||^2_Diag(beta_t)``, whose closed form
    is, per value column j, ``S_t = (I - eps k k^T) S_{t-1} + eps k v^T`` with
    ``eps = beta_j / (1 + beta_j k^T k)``.

    Args:
        beta: step size [B, H, T] (one per token) or [B, H, T, Dv] (one per value column, as in the
            paper), >= 0. With a per-column beta the chunk form runs one delta rule per value column.
        (impl="autograd" forms the (Dk Dv) x (Dk Dv) Hessian of the objective per head and token:
        a reference for small heads only.)
        (others: see the module docstring.)
    """
    B, H, T, _ = check_qkv(q, k, v, same_qk_v_dim=False)
    Dv = v.shape[-1]
    dt = compute_dtype(q.dtype)
    shape = (B, H, T, Dv) if getattr(beta, "dim", lambda: 0)() == 4 else (B, H, T)
    tokens = {"k": k, "v": v, "beta": _beta(beta, shape, dt)}
    return run_rule("longhorn", q, v, tokens, scale, initial_state, output_final_state, impl, chunk_size)


def comba(
    q: Tensor, k: Tensor, v: Tensor, *, p: Tensor, beta: Tensor, alpha: Tensor | None = None,
    log_alpha: Tensor | None = None,
    scale: float | None = None, initial_state: Tensor | None = None, output_final_state: bool = False,
    impl: str = "chunk", chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """Comba (closed-loop control): the correction reads the prediction with a second key ``p`` and
    writes it along ``k``, ``S_t = (alpha_t - beta_t k_t p_t^T) S_{t-1} + beta_t k_t v_t^T``
    (the Comba paper's form; fla's ``naive_recurrent_comba`` decays first instead, see README.md).

    Args:
        p: the second ("feedback") key [B, H, T, Dk].
        beta: learning rate [B, H, T], >= 0.
        alpha: scalar decay [B, H, T] in (0, 1]; or instead ``log_alpha`` (<= 0).
        (others: see the module docstring.)
    """
    B, H, T, Dk = check_qkv(q, k, v, same_qk_v_dim=False)
    dt = compute_dtype(q.dtype)
    tokens = {"k": k, "v": v, "p": check_gate("p", p, (B, H, T, Dk), dt), "beta": _beta(beta, (B, H, T), dt)}
    tokens["log_alpha"] = resolve_log_decay(alpha, log_alpha, (B, H, T), dt)
    return run_rule("comba", q, v, tokens, scale, initial_state, output_final_state, impl, chunk_size)


def rwkv7(
    q: Tensor, k: Tensor, v: Tensor, *, beta: Tensor, k_hat: Tensor, alpha: Tensor | None = None,
    log_alpha: Tensor | None = None,
    scale: float | None = None, initial_state: Tensor | None = None, output_final_state: bool = False,
    impl: str = "chunk", chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """RWKV-7 ("Goose"): ``S_t = (Diag(alpha_t) - (beta_t * k_hat_t) k_hat_t^T) S_{t-1} + k_t v_t^T``
    (the paper's ``S_t = S_{t-1}(diag(w_t) - kappa^T (a_t * kappa)) + v_t^T k~_t`` transposed to the
    [Dk, Dv] layout: q = r, k = k~, alpha = w, beta = a, k_hat = kappa-hat).

    Args:
        beta: in-context learning rate per key channel [B, H, T, Dk], in [0, 1].
        k_hat: removal key [B, H, T, Dk] (L2-normalised in the paper; not enforced).
        alpha: per-channel decay w [B, H, T, Dk] in (0, 1]; or instead ``log_alpha`` (<= 0).
        (others: see the module docstring; fla's rwkv7 uses scale=1.0, pass it explicitly.)
    """
    B, H, T, Dk = check_qkv(q, k, v, same_qk_v_dim=False)
    dt = compute_dtype(q.dtype)
    tokens = {
        "k": k,
        "v": v,
        "beta": _beta(beta, (B, H, T, Dk), dt, high=1.0),
        "k_hat": check_gate("k_hat", k_hat, (B, H, T, Dk), dt),
        "log_alpha": resolve_log_decay(alpha, log_alpha, (B, H, T, Dk), dt),
    }
    return run_rule("rwkv7", q, v, tokens, scale, initial_state, output_final_state, impl, chunk_size)
