"""``ttt.ops.compile_chunk_steps``: the chunked forms with compiled loop bodies equal the eager ones.

One call per operator that resumes inside a mini-batch (offset 5 of 8), runs two full mini-batches and
ends in a partial one, compared in float32 with the eager chunked form: output, final state and the
gradients of every input and of the initial anchor. Compilation dominates the run time on CPU (tens of
seconds per graph), so the shapes are chosen to need few graphs: both partial segments have 3 tokens and
see inputs of the same shapes, strides and ``requires_grad`` (the initial gradient sum does not require a
gradient, like the zeros that follow a completed mini-batch).
"""

import dataclasses
import doctest
import os
import subprocess
import sys

import pytest
import torch

import ttt
from ttt.ops import _compile
from ttt.ops.ttt_linear import scan
from ttt.ops.ttt_mlp import chunk as mlp_chunk
from ttt.testing import ttt_inputs

OPS = {"ttt_linear": (ttt.ops.ttt_linear, None), "ttt_mlp": (ttt.ops.ttt_mlp, 8)}
MB, OFFSET, T = 8, 5, 22  # segments of 3, 8, 8, 3 tokens


@pytest.fixture(scope="module")
def compiler_works():
    """Skip (with the reason) where torch.compile cannot run at all, e.g. no C++ compiler for Inductor."""
    if not torch._dynamo.is_dynamo_supported():
        pytest.skip("torch.compile (dynamo) is not supported on this Python / platform")
    try:
        torch.compile(lambda x: x * 2 + 1, dynamic=False, fullgraph=True)(torch.ones(3))
    except Exception as err:
        pytest.skip(f"torch.compile does not work here: {type(err).__name__}: {str(err)[:200]}")


@pytest.fixture(autouse=True)
def eager_after_test():
    yield
    ttt.ops.compile_chunk_steps(False)


def _resumed_state(op, x):
    """The state after ``OFFSET`` tokens, as leaves: the anchor requires a gradient, the grad sum not."""
    pre = {k: (v[:, :, :OFFSET] if k in ("q", "k", "v", "lr") else v) for k, v in x.items()}
    with torch.no_grad():
        st = _call(op, pre, pre["initial_state"]).final_state
    anchor = tuple(a.contiguous().requires_grad_() for a in st.anchor)
    grad_sum = tuple(g.contiguous() for g in st.grad_sum)
    return dataclasses.replace(st, anchor=anchor, grad_sum=grad_sum)


def _call(op, x, state):
    return op(x["q"], x["k"], x["v"], x["lr"], x["ln_weight"], x["ln_bias"], initial_state=state,
              mini_batch_size=MB, output_final_state=True, impl="chunk")  # fmt: skip


def _inputs(variant: str):
    """Inputs of ``T`` tokens and the (eager) state after the ``OFFSET`` tokens before them."""
    op, hidden = OPS[variant]
    x = ttt_inputs(2, 2, OFFSET + T, 4, hidden=hidden, dtype=torch.float32, seed=1)
    state = _resumed_state(op, x)
    x = {k: (v[:, :, OFFSET:] if k in ("q", "k", "v", "lr") else v) for k, v in x.items()}
    return {k: v.clone().requires_grad_() for k, v in x.items() if k != "initial_state"}, state


def _run(variant: str, x, state) -> dict:
    """Output, final state and gradients of one resumed call with the switch as it is set now."""
    o, final = _call(OPS[variant][0], x, state)
    loss = (o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum()
    loss = loss + sum((w * w).sum() for w in (*final.anchor, *final.grad_sum, *final.weights))
    grads = torch.autograd.grad(loss, [*x.values(), *state.anchor])
    names = [f"d{k}" for k in x] + [f"d_anchor{i}" for i in range(len(state.anchor))]
    out = {"o": o.detach(), "offset": final.offset, **dict(zip(names, grads))}
    out.update({f"anchor{i}": a.detach() for i, a in enumerate(final.anchor)})
    out.update({f"grad_sum{i}": g.detach() for i, g in enumerate(final.grad_sum)})
    return out


@pytest.mark.parametrize("variant", OPS)
def test_compiled_steps_equal_eager(variant, compiler_works):
    x, state = _inputs(variant)
    eager = _run(variant, x, state)
    ttt.ops.compile_chunk_steps()
    compiled = _run(variant, x, state)
    assert compiled.pop("offset") == eager.pop("offset") == (OFFSET + T) % MB
    for name, ref in eager.items():
        err = (compiled[name] - ref).abs().max().item()
        assert err <= 1e-5 * ref.abs().max().item() + 1e-7, f"{name}: max abs error {err:.2e}"
    # the compiled bodies were used (fullgraph=True: a graph break would have raised, not fallen back)
    bodies = {fn for fn, _ in _compile._CACHE}
    expected = {"ttt_linear": {scan._forward_step, scan._backward_step}, "ttt_mlp": {mlp_chunk.dual_segment}}
    assert expected[variant] <= bodies


def test_switch_off_is_eager():
    ttt.ops.compile_chunk_steps()
    assert _compile.maybe_compiled(mlp_chunk.dual_segment) is not mlp_chunk.dual_segment
    ttt.ops.compile_chunk_steps(False)
    assert _compile.maybe_compiled(mlp_chunk.dual_segment) is mlp_chunk.dual_segment
    assert not _compile.chunk_steps_compiled()


def test_docstring_example_runs():
    result = doctest.testmod(_compile, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_environment_variable_turns_it_on():
    code = "from ttt.ops import _compile; print(_compile.chunk_steps_compiled())"
    env = {**os.environ, "TTT_COMPILE_STEPS": "1"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "True"


def test_recompile_limit_falls_back_to_eager(compiler_works, monkeypatch):
    """Every new sequence length is a new graph for TTT-Linear's scan step: past dynamo's recompile limit a
    body runs eagerly with one warning instead of failing (backend="eager": no code generation)."""
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 2, raising=False)
    monkeypatch.setattr(torch._dynamo.config, "cache_size_limit", 2, raising=False)  # torch < 2.6
    torch._dynamo.reset()
    ttt.ops.compile_chunk_steps(backend="eager")
    x = ttt_inputs(1, 2, 32, 4, dtype=torch.float32, seed=2)
    with pytest.warns(UserWarning, match="recompile limit"):
        for length in (8, 16, 24, 32):
            part = {k: (v[:, :, :length] if k in ("q", "k", "v", "lr") else v) for k, v in x.items()}
            with torch.no_grad():
                got = _call(ttt.ops.ttt_linear, part, part["initial_state"]).output
                ttt.ops.compile_chunk_steps(False)
                want = _call(ttt.ops.ttt_linear, part, part["initial_state"]).output
                ttt.ops.compile_chunk_steps(backend="eager")
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


@pytest.mark.parametrize(
    ("value", "on"), [("1", True), ("true", True), ("0", False), ("False", False), ("off", False)]
)
def test_environment_variable_values(value, on):
    assert _compile._env_switch(value) is on
