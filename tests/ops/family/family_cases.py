"""Input factories for the family-rule tests: one random, valid problem per rule.

Each case returns the leaf tensors (all requiring grad) and a function ``run(impl, chunk_size)`` that
calls the public op with them, so forward and every gradient can be compared across forms.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

import ttt.ops.family as fam

ALL_RULES = [
    "linear_attention",
    "retnet",
    "mamba2",
    "gla",
    "hgrn2",
    "hebbian",
    "deltanet",
    "gated_deltanet",
    "kda",
    "longhorn",
    "longhorn_per_column",
    "comba",
    "rwkv7",
]


@dataclass
class Case:
    leaves: dict[str, Tensor]
    call: Callable[..., tuple[Tensor, Tensor | None]]

    def run(self, impl: str, chunk_size: int = 8, output_final_state: bool = True):
        return self.call(impl=impl, chunk_size=chunk_size, output_final_state=output_final_state)


def make_case(
    rule: str,
    B: int = 2,
    H: int = 2,
    T: int = 19,
    Dk: int = 5,
    Dv: int = 4,
    *,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    with_state: bool = True,
) -> Case:
    """A random problem for ``rule``: unit-norm keys, decays in (0.5, 1), learning rates in (0, 1)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    def rand(*shape, low=0.0, high=1.0):
        return low + (high - low) * torch.rand(*shape, generator=g, dtype=dtype)

    L = {
        "q": randn(B, H, T, Dk),
        "k": F.normalize(randn(B, H, T, Dk), dim=-1),
        "v": randn(B, H, T, Dv),
    }
    if with_state:
        L["initial_state"] = randn(B, H, Dk, Dv)
    scalar_decay = lambda: rand(B, H, T, low=0.5, high=1.0)  # noqa: E731
    vector_decay = lambda: rand(B, H, T, Dk, low=0.5, high=1.0)  # noqa: E731
    extra: dict[str, Tensor] = {}
    if rule in ("retnet",):
        extra = {"alpha": rand(H, low=0.5, high=1.0), "beta": rand(B, H, T)}
    elif rule in ("mamba2", "gated_deltanet"):
        extra = {"alpha": scalar_decay(), "beta": rand(B, H, T)}
    elif rule == "gla":
        extra = {"alpha": vector_decay()}
    elif rule == "hgrn2":
        del L["k"]
        extra = {"alpha": vector_decay()}
    elif rule == "hebbian":
        extra = {"decay": rand(H, low=0.5, high=1.0), "lr": rand(H)}
    elif rule == "deltanet":
        extra = {"beta": rand(B, H, T)}
    elif rule == "kda":
        extra = {"alpha": vector_decay(), "beta": rand(B, H, T)}
    elif rule == "longhorn":
        extra = {"beta": rand(B, H, T)}
    elif rule == "longhorn_per_column":
        extra = {"beta": rand(B, H, T, Dv)}
    elif rule == "comba":
        extra = {"p": F.normalize(randn(B, H, T, Dk), dim=-1), "alpha": scalar_decay(), "beta": rand(B, H, T)}
    elif rule == "rwkv7":
        extra = {
            "k_hat": F.normalize(randn(B, H, T, Dk), dim=-1),
            "alpha": vector_decay(),
            "beta": rand(B, H, T, Dk),
        }
    L.update(extra)
    for x in L.values():
        x.requires_grad_(True)
    op = getattr(fam, rule.replace("_per_column", ""))

    def call(**kw):
        return op(**L, **kw)

    return Case(L, call)


def grads(
    case: Case, impl: str, chunk_size: int = 8, seed: int = 1
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Forward (o, S_T) and the gradients of a random linear functional of both w.r.t. every leaf."""
    o, S = case.run(impl, chunk_size)
    g = torch.Generator().manual_seed(seed)
    do = torch.randn(o.shape, generator=g, dtype=o.dtype)
    dS = torch.randn(S.shape, generator=g, dtype=S.dtype)
    loss = (o * do).sum() + (S * dS).sum()
    names = list(case.leaves)
    gs = torch.autograd.grad(loss, [case.leaves[n] for n in names])
    return o.detach(), S.detach(), dict(zip(names, gs))
