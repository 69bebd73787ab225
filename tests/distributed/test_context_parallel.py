"""Context parallelism over R = 2 and 4 gloo processes equals one process: outputs, final states and
every gradient, float64 (inputs in tests/distributed/cp_cases.py). One launch per R runs every case."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ttt.ops.family as fam
from ttt.distributed import cp_bytes, cp_family, cp_ttt, spawn
from ttt.ops import ttt_linear

from . import cp_cases as C

CASES = list(C.build_cases())
# R = 2 also pipelines the relay over 2 micro-batches; R = 4 ends its segments inside a mini-batch (T_r = 6, b = 4)
MICRO = {2: 2, 4: 1}


@pytest.fixture(scope="module", params=[2, 4], ids=lambda r: f"R{r}")
def ranks(request):
    R = request.param
    return R, spawn(C.run_ranks, R, None, MICRO[R], start_method="fork")


@pytest.fixture(scope="module")
def single():
    return {name: C.run_one(name, case) for name, case in C.build_cases().items()}


@pytest.mark.parametrize("name", CASES)
def test_equals_one_process(ranks, single, name):
    R, results = ranks
    ref, case = single[name], C.build_cases()[name]
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)  # noqa: E731
    close(torch.cat([r[name]["o"] for r in results], dim=2), ref["o"])
    if ref["s"] is not None:
        close(results[-1][name]["s"], ref["s"])
    for key, grad in ref["grads"].items():
        if key in case["time"]:  # each rank holds the gradient of its own shard
            close(torch.cat([r[name]["grads"][key] for r in results], dim=2), grad)
        else:  # copies on every rank: their gradients summed over the ranks
            close(results[0][name]["grads"][key], grad)


@pytest.mark.parametrize(
    "name,scheme", [("ttt_linear", "relay"), ("linear_attention", "scan"), ("attention", "kv")]
)
def test_counted_bytes_match_analytic(ranks, name, scheme):
    R, results = ranks
    kw = {"state_numel": C.D * C.D + C.D, "mid_mini_batch": (C.T // R) % 4 != 0} if scheme == "relay" else {}
    expect = cp_bytes(scheme, B=C.B, H=C.H, T=C.T, D=C.D, R=R, element_size=8, **kw)
    busiest = {d: max(r[name]["bytes"][d] for r in results) for d in ("forward", "backward")}
    assert busiest == expect
    if scheme == "relay":  # the last rank sends nothing forward, the first nothing backward
        assert results[-1][name]["bytes"]["forward"] == 0 and results[0][name]["bytes"]["backward"] == 0


def test_relay_without_autograd():
    out = spawn(C.run_no_grad, 2, start_method="fork")
    case = C.build_cases()["ttt_linear"]
    with torch.no_grad():
        ref, _ = C._forward("ttt_linear", case["time"], case["shared"], case["kw"], cp=False)
    torch.testing.assert_close(torch.cat(out, dim=2), ref, rtol=1e-12, atol=1e-12)


def test_bad_calls_are_named():
    q = torch.randn(2, 1, 4, 4)
    with pytest.raises(RuntimeError, match="torch.distributed initialised"):
        cp_family(fam.deltanet, q, q, q, beta=torch.rand(2, 1, 4))
    with pytest.raises(ValueError, match="cp_family runs one of"):
        cp_family(fam.longhorn, q, q, q)
    with pytest.raises(ValueError, match="scheme must be"):
        cp_bytes("ring", B=1, H=1, T=4, D=4, R=2, element_size=4)
    with pytest.raises(RuntimeError, match="torch.distributed initialised"):
        cp_ttt(ttt_linear, q, q, q, torch.rand(2, 1, 4), torch.ones(1, 4), torch.zeros(1, 4),
               initial_state=(torch.zeros(1, 4, 4), torch.zeros(1, 4)))  # fmt: skip


@pytest.mark.parametrize("R,micro_batches", [(2, 2), (4, 1)])
def test_language_model_layers_equal_one_process(R, micro_batches):
    model = C.make_lm()
    x = C.lm_tokens()
    logits, _ = model(x[:, :-1])
    F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).backward()
    out = spawn(C.run_lm, R, micro_batches, start_method="fork")
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)  # noqa: E731
    close(torch.cat([r["logits"] for r in out], dim=1), logits.detach())
    for name, p in model.named_parameters():
        torch.testing.assert_close(out[0]["grads"][name], p.grad, rtol=1e-9, atol=1e-11, msg=name)


def test_enable_context_parallel_refuses_layers_without_a_form():
    from ttt.distributed import enable_context_parallel
    from ttt.models import CausalLM, LMConfig

    small = dict(vocab_size=16, dim=16, n_layers=1, n_heads=2, mlp_hidden=32, max_seq_len=64)
    with pytest.raises(
        ValueError, match=r"blocks.0.mixer \(SoftmaxAttention\) has no context-parallel layer form"
    ):
        enable_context_parallel(CausalLM(LMConfig(**small, mixer="attention")))
    with pytest.raises(ValueError, match="share_qk=True"):
        enable_context_parallel(CausalLM(LMConfig(**small, mixer_kwargs={"ttt_linear": {"share_qk": True}})))
