"""Every family rule declared once: its inner objective (form (a)) and its hand-derived closed form
(the DPLR transition that forms (b) and (c) run). The derivations are in README.md.

Objectives are written for one head: S [Dk, Dv], k [Dk], v [Dv]; scalar gates are 0-d, vector gates
[Dk] (or [Dv] for Longhorn's step size). ``S0`` is the point the step starts from, held fixed by the
inner gradient (``sg(S)`` in the formulas): it gives the semi-gradient of Comba and RWKV7, whose
correction reads the prediction with one key and writes along another.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .engine import Objective, Token
from .transition import Transition


@dataclass(frozen=True)
class Rule:
    """A family rule: name, objective (autograd form) and closed form (recurrent/chunk forms)."""

    name: str
    objective: Objective
    closed_form: Callable[[Token], Transition]
    recurrence: str


def _read(S: Tensor, x: Tensor) -> Tensor:
    """``S^T x`` for one head: S [Dk, Dv], x [Dk] -> [Dv]."""
    return x @ S


def _decay_penalty(S: Tensor, alpha: Tensor) -> Tensor:
    """``1/2 ||sqrt(Diag(1 - alpha)) S||_F^2``; alpha scalar or [Dk] (one factor per row of S)."""
    shrink = 1.0 - alpha
    if shrink.dim() == 1:
        shrink = shrink.unsqueeze(-1)
    return 0.5 * (shrink * S * S).sum()


def _no_decay(like: Tensor) -> None:
    """No decay (``g = 0``): the forms skip the decay factors altogether."""
    return None


def _scalar(x: Tensor) -> Tensor:  # [B, H, T] -> [B, H, T, 1]
    return x.unsqueeze(-1)


# additive rows: S_t = Diag(alpha_t) S_{t-1} + beta_t k_t v_t^T ----------------------------------

LINEAR_ATTENTION = Rule(
    name="linear_attention",
    objective=Objective(
        loss=lambda S, t, S0: -(_read(S, t["k"]) * t["v"]).sum(),
        formula="L = -<S^T k, v>",
    ),
    closed_form=lambda t: Transition(_no_decay(t["k"]), t["k"], t["v"]),
    recurrence="S_t = S_{t-1} + k_t v_t^T",
)

# RetNet (alpha per head), Mamba2 (alpha_t per token) and Hebbian fast weights (decay, lr constants)
_SCALAR_DECAY_OBJECTIVE = Objective(
    loss=lambda S, t, S0: -t["beta"] * (_read(S, t["k"]) * t["v"]).sum() + _decay_penalty(S, t["alpha"]),
    formula="L = -beta <S^T k, v> + 1/2 ||sqrt(1 - alpha) S||_F^2",
)


def _scalar_decay_closed_form(t: Token) -> Transition:
    return Transition(_scalar(t["log_alpha"]), _scalar(t["beta"]) * t["k"], t["v"])


RETNET = Rule(
    "retnet",
    _SCALAR_DECAY_OBJECTIVE,
    _scalar_decay_closed_form,
    "S_t = alpha S_{t-1} + beta_t k_t v_t^T  (alpha = gamma per head)",
)
MAMBA2 = Rule(
    "mamba2",
    _SCALAR_DECAY_OBJECTIVE,
    _scalar_decay_closed_form,
    "S_t = alpha_t S_{t-1} + beta_t k_t v_t^T  (alpha_t = exp(dt_t A), beta_t = dt_t, k = B, q = C)",
)
HEBBIAN = Rule(
    "hebbian",
    _SCALAR_DECAY_OBJECTIVE,
    _scalar_decay_closed_form,
    "S_t = lambda S_{t-1} + eta k_t v_t^T  (Ba et al. 2016: A(t+1) = lambda A(t) + eta h h^T)",
)

GLA = Rule(
    name="gla",
    objective=Objective(
        loss=lambda S, t, S0: -(_read(S, t["k"]) * t["v"]).sum() + _decay_penalty(S, t["alpha"]),
        formula="L = -<S^T k, v> + 1/2 ||sqrt(Diag(1 - alpha)) S||_F^2",
    ),
    closed_form=lambda t: Transition(t["log_alpha"], t["k"], t["v"]),
    recurrence="S_t = Diag(alpha_t) S_{t-1} + k_t v_t^T",
)

# HGRN2: the key is tied to the forget gate, k_t = 1 - alpha_t (the public op derives it)
HGRN2 = Rule(
    name="hgrn2",
    objective=Objective(
        loss=lambda S, t, S0: -(_read(S, 1.0 - t["alpha"]) * t["v"]).sum() + _decay_penalty(S, t["alpha"]),
        formula="L = -<S^T (1 - alpha), v> + 1/2 ||sqrt(Diag(1 - alpha)) S||_F^2",
    ),
    closed_form=lambda t: Transition(t["log_alpha"], -torch.expm1(t["log_alpha"]), t["v"]),
    recurrence="S_t = Diag(alpha_t) S_{t-1} + (1 - alpha_t) v_t^T",
)

# delta rows: S_t = (D_t - remove_t read_t^T) S_{t-1} + write_t v_t^T ----------------------------

_MSE = lambda S, t, S0: 0.5 * t["beta"] * ((_read(S, t["k"]) - t["v"]) ** 2).sum()  # noqa: E731


def _delta_closed_form(t: Token, log_decay: Tensor, decayed_key: Tensor) -> Transition:
    step_key = _scalar(t["beta"]) * t["k"]
    return Transition(log_decay, step_key, t["v"], remove=step_key, read=decayed_key)


DELTANET = Rule(
    name="deltanet",
    objective=Objective(loss=_MSE, formula="L = beta/2 ||S^T k - v||^2"),
    closed_form=lambda t: _delta_closed_form(t, _no_decay(t["k"]), t["k"]),
    recurrence="S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T",
)

GATED_DELTANET = Rule(
    name="gated_deltanet",
    objective=Objective(
        loss=_MSE,
        decay_first=lambda S, t: t["alpha"] * S,
        formula="L = beta/2 ||S~^T k - v||^2 on the decayed state S~ = alpha S",
    ),
    # (I - beta k k^T) alpha S: the correction reads the decayed state, i.e. read = alpha k
    closed_form=lambda t: _delta_closed_form(t, _scalar(t["log_alpha"]), _scalar(t["alpha"]) * t["k"]),
    recurrence="S_t = (I - beta_t k_t k_t^T) alpha_t S_{t-1} + beta_t k_t v_t^T",
)

KDA = Rule(
    name="kda",
    objective=Objective(
        loss=_MSE,
        decay_first=lambda S, t: t["alpha"].unsqueeze(-1) * S,
        formula="L = beta/2 ||S~^T k - v||^2 on the decayed state S~ = Diag(alpha) S",
    ),
    closed_form=lambda t: _delta_closed_form(t, t["log_alpha"], t["alpha"] * t["k"]),
    recurrence="S_t = (I - beta_t k_t k_t^T) Diag(alpha_t) S_{t-1} + beta_t k_t v_t^T",
)


def _longhorn_closed_form(t: Token) -> Transition:
    # the proximal step argmin 1/2||S - S_{t-1}||^2 + 1/2||S^T k - v||^2_Diag(beta) has, per value
    # column j, the step size eps_j = beta_j / (1 + beta_j k^T k)
    beta = t["beta"]
    k = t["k"]
    vector = beta.dim() == 4  # [B, H, T, Dv]
    beta = beta if vector else _scalar(beta)
    eps = beta / (1.0 + beta * (k * k).sum(-1, keepdim=True))
    if vector:
        return Transition(_no_decay(k), k, eps * t["v"], remove=k, read=k, col=eps)
    return Transition(_no_decay(k), k, eps * t["v"], remove=eps * k, read=k)


LONGHORN = Rule(
    name="longhorn",
    objective=Objective(
        loss=lambda S, t, S0: 0.5 * (t["beta"] * (_read(S, t["k"]) - t["v"]) ** 2).sum(),
        implicit=True,
        formula="S_t = argmin_S 1/2 ||S - S_{t-1}||^2 + 1/2 ||S^T k - v||^2_Diag(beta)  (implicit step)",
    ),
    closed_form=_longhorn_closed_form,
    recurrence=(
        "S_t = (I - eps_t k_t k_t^T) S_{t-1} + eps_t k_t v_t^T, eps_t = beta_t / (1 + beta_t k_t^T k_t)"
    ),
)


def _comba_transition(t: Token) -> Transition:
    # Comba removes along the key it writes: one tensor for both lets the chunk form share their products
    write = _scalar(t["beta"]) * t["k"]
    return Transition(_scalar(t["log_alpha"]), write, t["v"], remove=write, read=t["p"])


COMBA = Rule(
    name="comba",
    objective=Objective(
        loss=lambda S, t, S0: (
            _decay_penalty(S, t["alpha"])
            + t["beta"] * (_read(S, t["k"]) * (_read(S0, t["p"]) - t["v"])).sum()
        ),
        formula="L = 1/2 ||sqrt(1 - alpha) S||_F^2 + beta <S^T k, sg(S^T p) - v>",
    ),
    closed_form=lambda t: _comba_transition(t),
    recurrence="S_t = (alpha_t - beta_t k_t p_t^T) S_{t-1} + beta_t k_t v_t^T",
)

RWKV7 = Rule(
    name="rwkv7",
    objective=Objective(
        loss=lambda S, t, S0: (
            _decay_penalty(S, t["alpha"])
            + (_read(S, t["beta"] * t["k_hat"]) * _read(S0, t["k_hat"])).sum()
            - (_read(S, t["k"]) * t["v"]).sum()
        ),
        formula="L = 1/2 ||sqrt(Diag(1 - alpha)) S||_F^2 + <S^T (beta * k_hat), sg(S^T k_hat)> - <S^T k, v>",
    ),
    closed_form=lambda t: Transition(
        t["log_alpha"], t["k"], t["v"], remove=t["beta"] * t["k_hat"], read=t["k_hat"]
    ),
    recurrence="S_t = (Diag(alpha_t) - (beta_t * k_hat_t) k_hat_t^T) S_{t-1} + k_t v_t^T",
)

RULES: dict[str, Rule] = {
    r.name: r
    for r in (
        LINEAR_ATTENTION,
        RETNET,
        MAMBA2,
        GLA,
        HGRN2,
        HEBBIAN,
        DELTANET,
        GATED_DELTANET,
        KDA,
        LONGHORN,
        COMBA,
        RWKV7,
    )
}
