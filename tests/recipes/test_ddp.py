"""Two gloo processes (DDP) give the gradients and the training run of one process."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ttt.data import load_corpus, prepare, sample_batch
from ttt.models import CausalLM, LMConfig
from ttt.recipes.common import lm_loss
from ttt.recipes.train import train

from .test_train import small_args


def one_step_grads(model: torch.nn.Module, tokens: torch.Tensor, shard: tuple[int, int]) -> None:
    x, y = sample_batch(tokens, 8, 24, torch.Generator().manual_seed(0), shard=shard)
    logits, _ = model(x)
    lm_loss(logits, y).backward()


def _worker(rank: int, world: int, tmp: str, corpus_dir: str, port: int) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    tokens = prepare(load_corpus(corpus_dir)).train
    torch.manual_seed(0)
    model = CausalLM(LMConfig.from_name("micro", mixer="ttt_linear"))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    one_step_grads(ddp, tokens, (rank, world))
    if rank == 0:
        torch.save({n: p.grad for n, p in model.named_parameters()}, Path(tmp) / "ddp_grads.pt")
    result = train(small_args(corpus_dir, Path(tmp) / "ddp_run", steps=4, match_params="none"))
    if rank == 0:
        (Path(tmp) / "ddp_history.json").write_text(json.dumps(result.history))
    dist.destroy_process_group()


def test_two_process_gloo_ddp_matches_one_process(corpus_dir, tmp_path):
    port = 29500 + os.getpid() % 1000
    mp.spawn(_worker, args=(2, str(tmp_path), corpus_dir, port), nprocs=2, join=True)

    tokens = prepare(load_corpus(corpus_dir)).train
    torch.manual_seed(0)
    model = CausalLM(LMConfig.from_name("micro", mixer="ttt_linear"))
    one_step_grads(model, tokens, (0, 1))
    ddp_grads = torch.load(tmp_path / "ddp_grads.pt")
    for name, p in model.named_parameters():
        torch.testing.assert_close(ddp_grads[name], p.grad, atol=1e-6, rtol=1e-5, msg=name)

    single = train(small_args(corpus_dir, tmp_path / "single_run", steps=4, match_params="none"))
    ddp_history = json.loads((tmp_path / "ddp_history.json").read_text())
    for (_, a), (_, b) in zip(single.history["train"], ddp_history["train"]):
        assert abs(a - b) < 1e-5
    assert len(ddp_history["train"]) == 4
