"""Input factories and tolerance helpers shared by the tests (and usable by downstream code)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from ttt.ops.common import default_token_eta


def ttt_inputs(
    B: int = 2,
    H: int = 3,
    T: int = 37,
    D: int = 8,
    *,
    hidden: int | None = None,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    lr_scale: float = 0.3,
    requires_grad: bool = False,
) -> dict[str, Tensor | tuple[Tensor, ...]]:
    """Random TTT-Linear (``hidden=None``) or TTT-MLP inputs: q, k, v, lr, ln_weight, ln_bias, initial_state.

    Fast weights are ``[H, ...]`` (a learned W0 broadcast over the batch); scaled so the inner loop
    stays in a well-conditioned regime where float64 comparisons at 1e-10 are meaningful.
    """
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    out: dict = {
        "q": rand(B, H, T, D),
        "k": rand(B, H, T, D),
        "v": rand(B, H, T, D),
        "lr": (torch.rand(B, H, T, generator=g, dtype=torch.float64) * lr_scale).to(dtype),
        "ln_weight": 1 + rand(H, D, scale=0.2),
        "ln_bias": rand(H, D, scale=0.2),
    }
    if hidden is None:
        out["initial_state"] = (rand(H, D, D, scale=0.3), rand(H, D, scale=0.1))
    else:
        M = hidden
        out["initial_state"] = (rand(H, D, M, scale=0.4), rand(H, M, scale=0.1), rand(H, M, D, scale=0.4),
                                rand(H, D, scale=0.1))  # fmt: skip
    if requires_grad:
        for key, val in out.items():
            if isinstance(val, tuple):
                out[key] = tuple(t.clone().requires_grad_() for t in val)
            else:
                out[key] = val.clone().requires_grad_()
    return out


def stage_case(B: int, H: int, T: int, D: int, b: int, seed: int, device) -> tuple[dict, Callable]:
    """Float64 inputs of a kernel-stage comparison (TTT-Linear and TTT-MLP alike): q, k, v ``[B, H, T, D]``,
    lr ``[B, H, T]``, ln_w / ln_b ``[H, D]``, token_eta ``te [b]`` and an output gradient ``do``; plus the
    seeded ``r(*shape, scale=)`` that drew them, for the caller's op-specific state."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g, dtype=torch.float64).to(device) * scale  # noqa: E731
    x = dict(
        q=r(B, H, T, D, scale=0.7), k=r(B, H, T, D, scale=0.7), v=r(B, H, T, D),
        lr=torch.rand(B, H, T, generator=g, dtype=torch.float64).to(device) * 0.5,
        ln_w=1 + r(H, D, scale=0.2), ln_b=r(H, D, scale=0.2),
        te=default_token_eta(b, device), do=r(B, H, T, D),
    )  # fmt: skip
    return x, r


def grad_leaves(inputs: dict) -> list[Tensor]:
    """Every tensor of ``ttt_inputs(..., requires_grad=True)`` in a fixed order."""
    leaves = []
    for val in inputs.values():
        leaves.extend(val if isinstance(val, tuple) else [val])
    return [t for t in leaves if t.requires_grad]


def max_abs_diff(a, b) -> float:
    """Largest absolute difference over tensors or (nested) tuples of tensors."""
    if isinstance(a, Tensor):
        return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    return max((max_abs_diff(x, y) for x, y in zip(a, b)), default=0.0)


def dtype_tolerance(dtype: torch.dtype, scale: float = 1.0) -> float:
    """Tolerance for a result in ``dtype`` relative to a float64 oracle of magnitude ``scale``.

    A few hundred ulps of the dtype, covering the accumulation over a mini-batch.
    """
    return {torch.float64: 1e-10, torch.float32: 2e-4, torch.float16: 3e-2, torch.bfloat16: 1e-1}[
        dtype
    ] * scale


def random_projection_grads(outs, leaves: dict, seed: int = 1) -> dict:
    """Back-propagate ``sum_i <outs_i, N_i>`` (fixed float64 Gaussian directions ``N_i``, one per output)
    and return the gradient of every leaf that requires one: one backward checks every output's gradient
    path at once, and two forms given the same ``seed`` and output shapes get the same directions."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    loss = sum((t.double() * torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.device)).sum()
               for t in outs)  # fmt: skip
    loss.backward()
    return {key: val.grad for key, val in leaves.items() if val.requires_grad}


def budget(
    got: Tensor, ref64: Tensor, low: Tensor, dtype: torch.dtype, *, factor: float = 2.0, n_sum: int = 1
) -> tuple[float, float]:
    """``(err, bound)`` of the STYLE R13 numerics contract for a low-precision kernel result.

    ``err = max|got - ref64|`` must not exceed ``bound = factor * (max|low - ref64| + eps_dtype * max|ref64|
    * sqrt(n_sum))``, where ``low`` is the reference computed in the kernel's dtype (how much rounding the
    data itself causes) and ``n_sum`` the number of terms a result sums over (parameter gradients).
    """
    got, ref64, low = got.double(), ref64.double(), low.double()
    err = (got - ref64).abs().max().item()
    rounding = torch.finfo(dtype).eps * ref64.abs().max().item() * n_sum**0.5
    return err, factor * ((low - ref64).abs().max().item() + rounding)


def assert_within_budget(
    name: str, got: Tensor, ref64: Tensor, low: Tensor, dtype: torch.dtype, n_sum: int = 1
) -> None:
    """Assert ``budget``: factor 2, or 4 for float32, where kernel and reference are both pure round-off
    in different summation orders (token_eta and LN-parameter gradients sum over every token)."""
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err, bound = budget(got, ref64, low, dtype, factor=4.0 if dtype == torch.float32 else 2.0, n_sum=n_sum)
    assert err <= bound, f"{name}: max err {err:.3e} > budget {bound:.3e}"


class BudgetChecks:
    """Several :func:`assert_within_budget` checks that fail once, at the end, naming every quantity over its
    budget with its error and bound (so one failing run shows the whole picture, not its first entry)::

        with BudgetChecks() as check:
            check("o", got, ref64, low, dtype)
            check("grad lr", g, g64, g_low, dtype, n_sum=D)
    """

    def __init__(self) -> None:
        self.failures: list[str] = []

    def __call__(
        self, name: str, got: Tensor, ref64: Tensor, low: Tensor, dtype: torch.dtype, n_sum: int = 1
    ) -> None:
        try:
            assert_within_budget(name, got, ref64, low, dtype, n_sum)
        except AssertionError as err:
            self.failures.append(str(err))

    def __enter__(self) -> BudgetChecks:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and self.failures:
            raise AssertionError(f"{len(self.failures)} over budget: " + "; ".join(self.failures))


def assert_stage_matches(got: dict, ref: dict, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """Each entry of ``got`` (a tensor or a tuple of tensors, any float dtype) equals ``ref[name]`` (float64)
    to ``rtol`` and ``atol * (1 + max|ref|)``; a failure names the entry. For the kernels' stage tests,
    whose fp32 stages and float64 references differ by round-off only."""
    for name, val in got.items():
        vals, wants = (val, ref[name]) if isinstance(val, (tuple, list)) else ((val,), (ref[name],))
        for v, want in zip(vals, wants, strict=True):
            torch.testing.assert_close(v.double(), want, rtol=rtol, atol=atol * (1 + want.abs().max().item()),
                                       msg=lambda m, name=name: f"{name}: {m}")  # fmt: skip


def assert_graph_replay_equals_eager(step, fresh_state, token, steps: int, out: Tensor) -> None:
    """A decode step captured in a CUDA graph, replayed ``steps`` times == as many eager steps, bit for bit.

    Args:
        step: ``step(tokens, state, out) -> Tensor`` updating the flat tuple of tensors ``state`` in place
            (``out``: the output buffer, or None in the eager run).
        fresh_state: returns a new initial state (a tuple of CUDA tensors).
        token: ``token(t)`` returns the list of input tensors of step ``t``.
        steps: how many steps to compare.
        out: the output buffer the captured step writes.
    """
    state = fresh_state()
    eager = [step(token(t), state, None).clone() for t in range(steps)]
    graphed, buffers = fresh_state(), [torch.empty_like(x) for x in token(0)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # the first call compiles the kernel: not inside the capture
        step(buffers, tuple(t.clone() for t in graphed), out)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(buffers, graphed, out)
    for t in range(steps):
        for buffer, x in zip(buffers, token(t)):
            buffer.copy_(x)
        graph.replay()
        torch.testing.assert_close(out, eager[t], atol=0, rtol=0)
    for a, b in zip(state, graphed):
        assert torch.equal(a, b), "the graph-replayed state differs from the eager one"


def assert_padded_matches_rows(
    mixer, x: Tensor, lengths: list[int], *, atol: float = 1e-10, rtol: float = 0.0
) -> None:
    """A right-padded batch through ``mixer(x, mask=mask)`` equals each row run alone on its real tokens.

    Compares the outputs at the real positions and the gradients of ``sum <y, N>`` (fixed Gaussian ``N``
    on the real positions) w.r.t. ``x`` and every parameter of ``mixer``. The padded slots hold 50.0, so a
    leak shows; their gradient must be zero, like that of the tokens a shorter row never had.

    Args:
        mixer: a layer following the ``ttt.layers`` protocol.
        x: ``[B, T, C]``, float64 for tight tolerances.
        lengths: B real lengths, each at most T.
        atol, rtol: tolerances of every comparison. Default: ``1e-10``, ``0`` (float64).
    """
    steps = torch.arange(x.shape[1], device=x.device)
    mask = steps < torch.tensor(lengths, device=x.device)[:, None]  # [B, T]
    g = torch.Generator().manual_seed(1)
    direction = torch.randn(x.shape, generator=g, dtype=torch.float64).to(x) * mask[..., None]
    params = [p for p in mixer.parameters() if p.requires_grad]

    padded = torch.where(mask[..., None], x, torch.full_like(x, 50.0)).requires_grad_()
    y, _ = mixer(padded, mask=mask)
    got = torch.autograd.grad((y * direction).sum(), [padded, *params], allow_unused=True)

    rows = x.detach().clone().requires_grad_()
    row_outputs = [mixer(rows[r : r + 1, :n])[0] for r, n in enumerate(lengths)]
    loss = sum((y_r * direction[r : r + 1, :n]).sum() for r, (y_r, n) in enumerate(zip(row_outputs, lengths)))
    want = torch.autograd.grad(loss, [rows, *params], allow_unused=True)

    close = dict(atol=atol, rtol=rtol)
    for r, (y_r, n) in enumerate(zip(row_outputs, lengths)):
        torch.testing.assert_close(y[r : r + 1, :n], y_r, **close, msg=lambda m, r=r: f"row {r}: {m}")
    names = ["x", *(name for name, p in mixer.named_parameters() if p.requires_grad)]
    for name, a, b in zip(names, got, want, strict=True):
        assert (a is None) == (b is None), f"grad of {name}: reached in one run only"
        if a is not None:
            torch.testing.assert_close(a, b, **close, msg=lambda m, name=name: f"grad of {name}: {m}")


def tiny_llama(path, *, tie: bool = True, seed: int = 0, n_layers: int = 2):
    """A randomly initialised tiny HF ``LlamaForCausalLM`` (GQA 4/2 heads, RoPE theta 1e5) saved to the
    directory ``path`` with ``save_pretrained``, plus a tiny byte-level BPE ``tokenizer.json``; returns
    the model (float32, eval mode). For loader and ``ttt convert`` tests without a download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(sorted(alphabet))}}
    vocab["Ġt"], vocab["he"] = len(vocab), len(vocab) + 1
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=1e5, rms_norm_eps=1e-5,
        max_position_embeddings=256, tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norms, so a swapped norm weight would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("Ġ", "t"), ("h", "e")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(Path(path) / "tokenizer.json"))
    return model


def write_llama_gguf(model, tokenizer_json, path, *, metadata: dict | None = None, edit=None) -> None:
    """Write a HF Llama ``model`` as a float32 GGUF file the way llama.cpp's converter lays it out
    (per-head permuted q/k rows, ``blk.N.*`` names, tokenizer metadata from ``tokenizer_json``).

    For tests of broken files: ``metadata`` replaces the model's values of ``block_count``,
    ``context_length``, ``embedding_length``, ``feed_forward_length``, ``head_count``, ``head_count_kv``,
    ``rope_freq_base``, ``layer_norm_rms_eps``; ``edit(name, array)`` returns the array to write under
    ``name`` (None: leave the tensor out)."""
    import json

    import gguf

    c = model.config
    data = json.loads(Path(tokenizer_json).read_text())
    vocab = data["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    w = gguf.GGUFWriter(str(path), "llama")
    theta = c.rope_parameters["rope_theta"] if hasattr(c, "rope_parameters") else c.rope_theta
    values = {
        "block_count": c.num_hidden_layers,
        "context_length": c.max_position_embeddings,
        "embedding_length": c.hidden_size,
        "feed_forward_length": c.intermediate_size,
        "head_count": c.num_attention_heads,
        "head_count_kv": c.num_key_value_heads,
        "rope_freq_base": theta,
        "layer_norm_rms_eps": c.rms_norm_eps,
    }
    unknown = set(metadata or {}) - set(values)
    if unknown:
        raise ValueError(f"unknown GGUF metadata {sorted(unknown)}; choose from {sorted(values)}")
    for key, value in {**values, **(metadata or {})}.items():
        getattr(w, f"add_{key}")(value)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t == "<|endoftext|>" else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_eos_token_id(0)

    def permute(t, heads):  # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
        return t.reshape(heads, 2, t.shape[0] // heads // 2, t.shape[1]).swapaxes(1, 2).reshape(t.shape)

    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}  # fmt: skip
    for name, t in model.state_dict().items():
        t = t.float().numpy()
        if name == "model.embed_tokens.weight":
            out = "token_embd.weight"
        elif name == "model.norm.weight":
            out = "output_norm.weight"
        elif name == "lm_head.weight":
            if c.tie_word_embeddings:
                continue
            out = "output.weight"
        else:
            _, _, i, rest = name.split(".", 3)
            key = rest.removesuffix(".weight")
            if key == "self_attn.q_proj":
                t = permute(t, c.num_attention_heads)
            elif key == "self_attn.k_proj":
                t = permute(t, c.num_key_value_heads)
            out = f"blk.{i}.{names[key]}.weight"
        if edit is not None:
            t = edit(out, t)
            if t is None:
                continue
        w.add_tensor(out, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def load_script(path: str | Path, name: str | None = None) -> ModuleType:
    """Import the script at ``path`` (e.g. ``benchmarks/convert_report.py``, not a package module) as a
    module named ``name`` (default: its file's stem), registered in ``sys.modules`` (dataclasses look
    their module up there)."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
