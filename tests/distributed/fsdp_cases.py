"""A small training loop for the FSDP tests, the same on one plain process and on R sharded ones: a
2-block TTT-Linear LM on fixed random tokens, AdamW, gradient clipping; the global batch of every step
is cut into R contiguous row blocks."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ttt.distributed.fsdp import full_model_state, latest_sharded, load_sharded, save_sharded, shard_model
from ttt.models import CausalLM, LMConfig
from ttt.recipes.common import lm_loss

V, T, B_GLOBAL, STEPS = 32, 16, 4, 6


def make_model() -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(LMConfig(vocab_size=V, dim=32, n_layers=2, n_heads=2, mlp_hidden=64, max_seq_len=64))


def batches() -> torch.Tensor:
    return torch.randint(0, V, (STEPS, B_GLOBAL, T + 1), generator=torch.Generator().manual_seed(1))


def train(
    rank: int,
    world: int,
    *,
    sharded: bool = True,
    root: str | None = None,
    ckpt_every: int = 0,
    resume_from: str | None = None,
    kill_after: int | None = None,
    mixed_precision: bool = False,
    checkpoint_blocks: bool = False,
) -> dict:
    """Train to step ``STEPS``; returns the per-step global losses and (rank 0) the full weights."""
    model = make_model()
    if sharded:
        shard_model(model, mixed_precision=mixed_precision, checkpoint_blocks=checkpoint_blocks)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    start = 0
    if resume_from is not None:  # a step directory, or "latest" under root
        path = latest_sharded(root) if resume_from == "latest" else resume_from
        start = load_sharded(path, model, opt, {"step": 0})["step"]
    data, rows = batches(), B_GLOBAL // world
    losses = []
    for step in range(start, STEPS):
        x = data[step, rank * rows : (rank + 1) * rows]
        logits, _ = model(x[:, :-1])
        loss = lm_loss(logits.float(), x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = loss.detach()
        if world > 1:
            dist.all_reduce(value, op=dist.ReduceOp.AVG)
        losses.append(value.item())
        if kill_after is not None and step + 1 == kill_after and rank == world - 1:
            os._exit(3)  # a rank dies without warning, mid-run
        if ckpt_every and (step + 1) % ckpt_every == 0:
            save_sharded(root, step + 1, model, opt, {"step": step + 1})
    state = (
        full_model_state(model)
        if sharded
        else {k: v for k, v in model.state_dict().items() if k != "head.weight"}
    )
    return {"losses": losses, "state": state, "start": start}
