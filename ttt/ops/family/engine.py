"""Form (a): a rule declared as an inner objective, its update derived by autograd.

A rule is one step of (sub)gradient descent on a per-token objective over the state:

    S~_t = decay_first_t(S_{t-1})              (identity unless the rule decays first: GDN, KDA)
    S_t  = S~_t - grad L_t(S~_t)               (explicit step, every row but Longhorn)
    S_t  = argmin_S 1/2 ||S - S~_t||^2 + L_t(S) (implicit / proximal step: Longhorn)
    o_t  = S_t^T q_t

``grad L_t`` comes from ``torch.func.grad`` of the declared loss, never from a hand derivation; the
implicit step solves ``(I + hess L_t) Delta = grad L_t(S~_t)`` with the Hessian from ``torch.func``
(exact for the quadratic objectives here). Losses are written for one head: ``S`` [Dk, Dv] and the
token's tensors (k [Dk], v [Dv], scalar or vector gates); ``torch.func.vmap`` maps them over (B, H).

Relation to ``ttt.ops.ttt_general``: that operator differentiates a per-token loss of a prediction
``f_W(k)``; these objectives also regularise the state itself (``1/2 ||sqrt(1 - alpha) S||^2``), use a
semi-gradient (a stop-gradient on the prediction, Comba / RWKV7) or a proximal step, none of which is
a loss of ``f_W(k)``. With the plain MSE loss and no decay both compute the DeltaNet step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import grad, jacrev, vmap

Token = dict[str, Tensor]


@dataclass(frozen=True)
class Objective:
    """A rule's inner objective.

    Attributes:
        loss: ``L_t(S, token, S0) -> scalar`` for one head; S [Dk, Dv]. The gradient is taken in
            ``S`` only; ``S0`` is the same point held fixed (a stop-gradient at the inner level that,
            unlike ``.detach()``, keeps the outer graph to q, k, v and the gates).
        decay_first: optional ``(S, token) -> S~`` applied before the step (the seed's reading of
            GDN and KDA as SGD on the decayed state).
        implicit: take the proximal (implicit) step instead of the explicit one.
        formula: the objective in the seed table's notation (for docs and error messages).
    """

    loss: Callable[[Tensor, Token, Tensor], Tensor]
    decay_first: Callable[[Tensor, Token], Tensor] | None = None
    implicit: bool = False
    formula: str = ""


def _explicit_step(objective: Objective) -> Callable[[Tensor, Token], Tensor]:
    grad_loss = grad(objective.loss)
    return lambda S, tok: S - grad_loss(S, tok, S)


def _implicit_step(objective: Objective) -> Callable[[Tensor, Token], Tensor]:
    grad_loss = grad(objective.loss)
    # reverse-over-reverse (torch.func.hessian is forward-over-reverse) keeps the outer autograd
    # (gradients w.r.t. q, k, v, gates) available
    hess_loss = jacrev(grad_loss)

    def step(S: Tensor, tok: Token) -> Tensor:
        n = S.numel()
        H = hess_loss(S, tok, S).reshape(n, n)
        system = torch.eye(n, dtype=S.dtype, device=S.device) + H
        delta = torch.linalg.solve(system, grad_loss(S, tok, S).reshape(n, 1))
        return S - delta.reshape(S.shape)

    return step


def autograd_rule(
    objective: Objective, q: Tensor, tokens: Token, initial_state: Tensor
) -> tuple[Tensor, Tensor]:
    """Run the rule token by token with the update derived by autograd.

    Args:
        objective: the rule's declaration.
        q: queries, already scaled, [B, H, T, Dk].
        tokens: per-token tensors, each [B, H, T] or [B, H, T, D] (k, v, gates, ...).
        initial_state: S_0 [B, H, Dk, Dv].

    Returns:
        o [B, H, T, Dv] and the final state [B, H, Dk, Dv].
    """
    step = _implicit_step(objective) if objective.implicit else _explicit_step(objective)
    if objective.decay_first is not None:
        inner, decay = step, objective.decay_first
        step = lambda S, tok: inner(decay(S, tok), tok)  # noqa: E731
    batched_step = vmap(vmap(step))
    S = initial_state
    outputs = []
    for t in range(q.shape[2]):
        S = batched_step(S, {name: x[:, :, t] for name, x in tokens.items()})
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], S))
    return torch.stack(outputs, dim=2), S
