"""Cases for the context-parallel equality tests: one function builds every input (full sequences, the
same on every rank by seed), ``run_ranks`` runs the context-parallel ops on a rank's shards and
``run_one`` runs the plain ops on the whole sequence. float64 throughout."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

import ttt.ops.family as fam
from ttt.distributed import COUNTER, cp_attention, cp_family, cp_ttt
from ttt.ops import ttt_linear, ttt_mlp

B, H, T, D = 2, 2, 24, 4
DT = torch.float64


def _rand(g, *shape, low=None, high=None):
    x = torch.rand(*shape, generator=g, dtype=DT)
    return x if low is None else low + (high - low) * x


def build_cases() -> dict[str, dict]:
    """``{name: {"time": {...}, "shared": {...}, "kw": {...}}}``: per-token tensors (dim 2 is T, sharded
    over ranks), tensors every rank holds a copy of, plain keywords."""
    g = torch.Generator().manual_seed(0)
    n = lambda *s: torch.randn(*s, generator=g, dtype=DT)  # noqa: E731
    qkv = lambda: {"q": n(B, H, T, D), "k": F.normalize(n(B, H, T, D), dim=-1), "v": n(B, H, T, D)}  # noqa: E731
    gate = lambda *s: _rand(g, B, H, T, *s, low=0.5, high=1.0)  # noqa: E731
    ttt_shared = lambda: {"ln_weight": 1 + 0.1 * n(H, D), "ln_bias": 0.1 * n(H, D)}  # noqa: E731
    cases = {
        "ttt_linear": {
            "time": {**qkv(), "lr": _rand(g, B, H, T, low=0.05, high=0.3)},
            "shared": {**ttt_shared(), "W0": 0.3 * n(H, D, D), "b0": 0.1 * n(H, D)},
            "kw": {"mini_batch_size": 4},
        },
        "ttt_mlp": {
            "time": {**qkv(), "lr": _rand(g, B, H, T, low=0.05, high=0.3)},
            "shared": {
                **ttt_shared(),
                "W1": 0.3 * n(H, D, 8),
                "b1": 0.1 * n(H, 8),
                "W2": 0.3 * n(H, 8, D),
                "b2": 0.1 * n(H, D),
            },  # fmt: skip
            "kw": {"mini_batch_size": 4},
        },
        "attention": {"time": qkv(), "shared": {}, "kw": {}},
    }
    family = {
        "linear_attention": {},
        "retnet": {"kw": {"alpha": 0.9}},
        "gla": {"time": {"alpha": gate(D)}},
        "hgrn2": {"time": {"alpha": gate(D)}},
        "mamba2": {"time": {"beta": gate(), "alpha": gate()}},
        "deltanet": {"time": {"beta": gate()}},
        "gated_deltanet": {"time": {"beta": gate(), "alpha": gate()}},
        "kda": {"time": {"beta": gate(), "alpha": gate(D)}},
        "comba": {"time": {"p": F.normalize(n(B, H, T, D), dim=-1), "beta": gate(), "alpha": gate()}},
        "rwkv7": {
            "time": {"beta": 0.5 * gate(D), "k_hat": F.normalize(n(B, H, T, D), dim=-1), "alpha": gate(D)}
        },
    }
    for name, extra in family.items():
        base = qkv()
        if name == "hgrn2":
            del base["k"]
        cases[name] = {
            "time": {**base, **extra.get("time", {})},
            "shared": {"S0": 0.3 * n(B, H, D, D)},
            "kw": {"chunk_size": 4, **extra.get("kw", {})},
        }
    return cases


def _forward(name: str, time: dict, shared: dict, kw: dict, cp: bool, micro_batches: int = 1):
    """``(o, final state tensor or None)``; ``cp`` picks the context-parallel call."""
    if name in ("ttt_linear", "ttt_mlp"):
        op = ttt_linear if name == "ttt_linear" else ttt_mlp
        init = (
            (shared["W0"], shared["b0"])
            if name == "ttt_linear"
            else tuple(shared[k] for k in ("W1", "b1", "W2", "b2"))
        )
        args = (time["q"], time["k"], time["v"], time["lr"], shared["ln_weight"], shared["ln_bias"])
        if cp:
            o, st = cp_ttt(
                op, *args, initial_state=init, output_final_state=True, micro_batches=micro_batches, **kw
            )
        else:
            o, st = op(*args, initial_state=init, output_final_state=True, **kw)
        return o, (None if st is None else st.weights[0])
    if name == "attention":
        if cp:
            return cp_attention(time["q"], time["k"], time["v"]), None
        return F.scaled_dot_product_attention(time["q"], time["k"], time["v"], is_causal=True), None
    op = getattr(fam, name)
    t = dict(time)
    q, k, v = t.pop("q"), t.pop("k", None), t.pop("v")
    if cp:
        return cp_family(op, q, k, v, initial_state=shared["S0"], output_final_state=True, **t, **kw)
    args = (q, v) if k is None else (q, k, v)
    return op(*args, initial_state=shared["S0"], output_final_state=True, impl="chunk", **t, **kw)


def _probes(o_shape, s_shape):
    g = torch.Generator().manual_seed(1)
    go = torch.randn(*o_shape, generator=g, dtype=DT)
    gs = torch.randn(*s_shape, generator=g, dtype=DT) if s_shape is not None else None
    return go, gs


def run_one(name: str, case: dict) -> dict:
    """One process, the whole sequence: output, final state and every gradient of the probe loss."""
    time = {k: x.clone().requires_grad_() for k, x in case["time"].items()}
    shared = {k: x.clone().requires_grad_() for k, x in case["shared"].items()}
    o, s = _forward(name, time, shared, case["kw"], cp=False)
    go, gs = _probes(o.shape, None if s is None else s.shape)
    loss = (o * go).sum() + (0 if s is None else (s * gs).sum())
    loss.backward()
    grads = {k: x.grad for k, x in {**time, **shared}.items()}
    return {"o": o.detach(), "s": None if s is None else s.detach(), "grads": grads}


def run_ranks(rank: int, world: int, names: list[str] | None = None, micro_batches: int = 1) -> dict:
    """Every case on this rank's shard; shared tensors' gradients summed over the ranks."""
    out = {}
    for name, case in build_cases().items():
        if names is not None and name not in names:
            continue
        T_r = T // world
        cut = slice(rank * T_r, (rank + 1) * T_r)
        time = {k: x[:, :, cut].clone().requires_grad_() for k, x in case["time"].items()}
        shared = {k: x.clone().requires_grad_() for k, x in case["shared"].items()}
        COUNTER.reset()
        o, s = _forward(name, time, shared, case["kw"], cp=True, micro_batches=micro_batches)
        go, gs = _probes((B, H, T, D), None if s is None else s.shape)
        loss = (o * go[:, :, cut]).sum()
        if s is not None and rank == world - 1:  # the final state's loss is counted once
            loss = loss + (s * gs).sum()
        loss.backward()
        grads = {k: x.grad.clone() if x.grad is not None else torch.zeros_like(x) for k, x in time.items()}
        for k, x in shared.items():
            gsum = x.grad.clone() if x.grad is not None else torch.zeros_like(x)
            dist.all_reduce(gsum)
            grads[k] = gsum
        out[name] = {
            "o": o.detach(),
            "s": None if s is None else s.detach(),
            "grads": grads,
            "bytes": dict(COUNTER.bytes),
        }
    return out


def run_no_grad(rank: int, world: int) -> torch.Tensor:
    """The relay under ``torch.no_grad`` (plain send/recv, no autograd functions)."""
    case = build_cases()["ttt_linear"]
    T_r = T // world
    time = {k: x[:, :, rank * T_r : (rank + 1) * T_r] for k, x in case["time"].items()}
    with torch.no_grad():
        o, _ = _forward("ttt_linear", time, case["shared"], case["kw"], cp=True, micro_batches=2)
    return o


def make_lm():
    from ttt.models import CausalLM, LMConfig

    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=16, dim=16, n_layers=2, n_heads=2, mlp_hidden=32, max_seq_len=64,
                   layer_mixers=("ttt_linear", "ttt_mlp"))  # fmt: skip
    for_cp = CausalLM(cfg).double()
    for block in for_cp.blocks:
        block.mixer.mini_batch_size = 4  # segments of 6 tokens (R = 4) end inside a mini-batch
        block.mixer.token_eta_offset = torch.nn.Parameter(torch.zeros(4, dtype=DT))
    return for_cp


def lm_tokens() -> torch.Tensor:
    return torch.randint(0, 16, (2, T + 1), generator=torch.Generator().manual_seed(2))


def run_lm(rank: int, world: int, micro_batches: int = 1) -> dict:
    """A two-block LM (TTT-Linear, TTT-MLP) with context parallelism: logits and summed parameter grads."""
    from ttt.distributed import enable_context_parallel

    model = enable_context_parallel(make_lm(), micro_batches=micro_batches)
    x, T_r = lm_tokens(), T // world
    cut = slice(rank * T_r, (rank + 1) * T_r)
    logits, _ = model(x[:, :-1][:, cut])
    loss = (
        F.cross_entropy(logits.flatten(0, 1), x[:, 1:][:, cut].flatten(), reduction="sum") / x[:, 1:].numel()
    )
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(g)
        grads[name] = g
    return {"logits": logits.detach(), "grads": grads}
