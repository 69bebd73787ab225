"""The family rules on flash-linear-attention's Triton chunk kernels (fla-core, an optional extra).

``fla_form(rule)`` returns a form with the signature the family dispatch gives its chunk form,
``form(q, tokens, initial_state, chunk_size) -> (o, S)``:

    q:             [B, H, T, Dk], already multiplied by ``scale``, in the compute dtype (float32).
    tokens:        the validated per-token tensors of the public op ([B, H, T] or [B, H, T, D]):
                   always ``k`` and ``v``; ``beta``, ``log_alpha`` (<= 0), ``p``, ``k_hat`` by rule.
    initial_state: S_0 [B, H, Dk, Dv] float32.
    chunk_size:    ignored (fla's kernels choose their own chunk, 64 or 16).
    returns:       o [B, H, T, Dv] and S_T [B, H, Dk, Dv], differentiable w.r.t. every input.

or ``None`` for a rule fla has no kernel for (longhorn). Our PyTorch forms stay the CPU path and the
oracle: ``tests/ops/family/test_fla_backend.py`` checks every mapping against our chunk form in float32,
output, final state and every gradient, on CUDA and on CPU under the Triton interpreter
(``TRITON_INTERPRET=1``; :mod:`ttt.ops.family.fla_interpreter` lets fla's kernels run there, for tests).

Conventions, ours -> fla (the same ones ``tests/ops/family/test_fla_oracle.py`` checks against fla's
pure-PyTorch references on CPU):

* layout: ours [B, H, T, D], fla's [B, T, H, D]: every tensor is transposed (and made contiguous) at
  the call and the output transposed back; states are [B, H, Dk, Dv] in both.
* scale: ours is applied to q before the form; fla's kernels get ``scale=1``.
* decay: ours ``log_alpha`` (natural log, <= 0) is fla's ``g`` / ``gk`` / ``w`` (also natural log).
* beta: the additive rows with a per-token rate (RetNet, Mamba2, Hebbian) fold it into the key,
  ``k <- beta k``, and run fla's ``chunk_simple_gla`` (scalar decay per token); RetNet's fixed-decay
  kernel ``chunk_retention`` is not used (its decays are hard-coded per head index).
* normalisation: fla's ``chunk_linear_attn`` normalises by ``q . sum k`` by default; ours does not
  (``normalize=False``).
* HGRN2: fla's GLA kernel with the key ``1 - alpha`` the public op already derives.
* DeltaNet: fla's gated delta-rule kernel with ``g = 0`` (its ``chunk_delta_rule`` asserts that its
  inputs are not float32; on the H200 the float32 check failed there).
* Comba: fla's chunk kernel computes the Comba paper's ``(alpha - beta k p^T) S`` (ours); fla's
  *recurrent* reference decays first, i.e. ours with ``p -> alpha p`` (docs/family.md).
* RWKV7: fla's DPLR ``S_t = Diag(exp(w)) S + b (a^T S) + k v^T`` with ``a = k_hat``,
  ``b = -(beta * k_hat)``.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["FLA_KERNELS", "fla_available", "fla_form", "register_fla_forms"]

Form = Callable[[Tensor, dict[str, Tensor], Tensor, int], tuple[Tensor, Tensor]]

#: rule -> fla-core chunk kernel (``module:function``) it runs on
FLA_KERNELS: dict[str, str] = {
    "linear_attention": "fla.ops.linear_attn:chunk_linear_attn",
    "retnet": "fla.ops.simple_gla:chunk_simple_gla",
    "mamba2": "fla.ops.simple_gla:chunk_simple_gla",
    "hebbian": "fla.ops.simple_gla:chunk_simple_gla",
    "gla": "fla.ops.gla:chunk_gla",
    "hgrn2": "fla.ops.gla:chunk_gla",
    # fla's chunk_delta_rule refuses float32 inputs (an assert); its gated kernel with g = 0 is the same rule
    "deltanet": "fla.ops.gated_delta_rule:chunk_gated_delta_rule",
    "gated_deltanet": "fla.ops.gated_delta_rule:chunk_gated_delta_rule",
    "kda": "fla.ops.kda:chunk_kda",
    "comba": "fla.ops.comba:chunk_comba",
    "rwkv7": "fla.ops.rwkv7:chunk_rwkv7",
}


def fla_available() -> bool:
    """Whether fla-core can be imported here (it needs Triton; its kernels need a CUDA device)."""
    try:
        importlib.import_module("fla.ops")
    except Exception:  # noqa: BLE001 -- any import failure (no package, no Triton driver) means "no"
        return False
    return True


def _kernel(rule: str, q: Tensor) -> Callable:
    """fla's kernel for ``rule``, after checking that ``q`` is something it runs on."""
    interpreted = q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    if not (q.is_cuda or interpreted) or q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(
            f"the fla backend of {rule!r} runs on CUDA tensors (or CPU ones under TRITON_INTERPRET=1) of "
            f"float32 / bfloat16 / float16, got {q.dtype} on {q.device} (the chunk form is the CPU and "
            "float64 path)"
        )
    module, name = FLA_KERNELS[rule].split(":")
    try:
        kernel = getattr(importlib.import_module(module), name)
    except ImportError as err:
        raise ImportError(
            f"the fla backend of {rule!r} needs fla-core (pip install fla-core==0.6.0): {err}"
        ) from err
    if interpreted:
        from . import fla_interpreter  # noqa: PLC0415 -- Triton internals, touched only here

        fla_interpreter.install()
    return kernel


def _bthd(x: Tensor) -> Tensor:
    """``[B, H, T, ...]`` -> fla's ``[B, T, H, ...]`` (contiguous)."""
    return x.transpose(1, 2).contiguous()


def _args(rule: str, q: Tensor, t: dict[str, Tensor]) -> dict[str, Tensor | bool]:
    """fla's keyword arguments for ``rule`` (layout still ours; transposed by the caller)."""
    k, v = t["k"], t["v"]
    if rule == "linear_attention":
        return {"q": q, "k": k, "v": v, "normalize": False}
    if rule in ("retnet", "mamba2", "hebbian"):
        return {"q": q, "k": t["beta"].unsqueeze(-1) * k, "v": v, "g": t["log_alpha"]}
    if rule in ("gla", "hgrn2"):
        return {"q": q, "k": k, "v": v, "g": t["log_alpha"]}
    if rule == "deltanet":
        return {"q": q, "k": k, "v": v, "g": torch.zeros_like(t["beta"]), "beta": t["beta"]}
    if rule in ("gated_deltanet", "kda"):
        return {"q": q, "k": k, "v": v, "g": t["log_alpha"], "beta": t["beta"]}
    if rule == "comba":
        return {"q": q, "k": k, "v": v, "p": t["p"], "g": t["log_alpha"], "beta": t["beta"]}
    if rule == "rwkv7":
        k_hat = t["k_hat"]
        return {"r": q, "w": t["log_alpha"], "k": k, "v": v, "a": k_hat, "b": -(t["beta"] * k_hat)}
    raise ValueError(f"no fla kernel for rule {rule!r}; rules with one: {sorted(FLA_KERNELS)}")


def fla_form(rule: str) -> Form | None:
    """The form running ``rule`` on fla-core's chunk kernel, or ``None`` if fla has none for it.

    The returned callable is ``form(q, tokens, initial_state, chunk_size) -> (o, S)`` with our layout
    (see the module docstring); fla-core is imported at the first call, not here.
    """
    if rule not in FLA_KERNELS:
        return None

    def form(q: Tensor, tokens: dict[str, Tensor], initial_state: Tensor, chunk_size: int = 64):
        """``q [B, H, T, Dk]`` (scaled), ``tokens``, ``S_0 [B, H, Dk, Dv]`` -> ``(o [B, H, T, Dv], S_T)``."""
        del chunk_size  # fla's kernels pick their own
        args = _args(rule, q, tokens)
        kwargs = {name: (_bthd(x) if isinstance(x, Tensor) else x) for name, x in args.items()}
        o, S = _kernel(rule, q)(
            **kwargs,
            scale=1.0,
            initial_state=initial_state.to(torch.float32).contiguous(),
            output_final_state=True,
        )
        return o.transpose(1, 2), S

    form.__name__ = form.__qualname__ = f"fla_{rule}"
    return form


def _registered_form(rule, q: Tensor, tokens: dict[str, Tensor], S0: Tensor, *, chunk_size: int):
    """The family dispatch's form signature (``rule`` is a ``Rule``) over :func:`fla_form`."""
    return fla_form(rule.name)(q, tokens, S0, chunk_size)


def register_fla_forms() -> None:
    """Make ``impl="fla"`` run fla-core's kernel for each rule it has one for (CUDA, or CPU under
    ``TRITON_INTERPRET=1``; fla-core installed).

    Not picked by ``impl="auto"``: every mapping equals our chunk form with fla's kernels run by the
    Triton interpreter on CPU, but not yet, all of them, compiled on a GPU (docs/family.md)."""
    from ..forms import Form, register_form

    for rule in FLA_KERNELS:
        register_form(
            rule,
            Form("fla", _registered_form, auto=False, devices=("cuda",), requires="fla", interpreted=True),
        )
