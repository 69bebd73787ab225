"""Whole-model benchmark: training tokens/s, model FLOPs utilisation and memory at growing context with the
tokens per step held constant; prefill and decode tokens/s and memory at contexts 1k ... 128k.

One process, one model at a time, bf16: training under ``torch.autocast(bfloat16)`` with float32 weights and
AdamW (one step = forward, backward, optimizer step); prefill and decode with the weights cast to bfloat16.
Decode runs after a prefill of the context, through ``ttt.models.static_decode.StaticDecoder``
(preallocated states updated in place; one CUDA-graph replay per token where every mixer can be captured)
and, for comparison, through ``CausalLM.step`` (new state objects per token: attention's cache grows by
``torch.cat``).

Before any timing, each (preset, mixer) passes a correctness gate on the device in float32: a prefill
plus single-token steps (``CausalLM.step``, and the static decoder) must give the logits of one forward
pass over the same tokens. A model that fails it is not timed.

Guards: every measurement catches out-of-memory (recorded as OOM) and other errors (recorded, the run
goes on); a case that runs past ``--case-limit`` seconds stops repeating and the larger sizes of that
mixer and phase are skipped; cases that would start after ``--budget`` seconds are skipped. Results are
written after every case (``model_gpu.md`` / ``model_gpu.json`` in ``--out``) and a short table is
printed last.

FLOPs (stated in the results file): per token, forward = 2 x (weights of every nn.Linear, the tied head
included) + each block's sequence-mixing term below; a training step counts 3 x forward (the backward
pass costs about twice the forward); MFU = counted FLOPs / step time / the GPU's dense bf16 peak.
Mixing terms per token and layer (C width, H heads, D head dim, b TTT mini-batch, W window, position i):

    attention       4 C (i + 1)        averaged over the sequence: 4 C (T + 1) / 2   (QK^T and AV, causal)
    swa             4 C min(i + 1, W)  averaged over the sequence
    ttt_linear      H (6 D^2 + 4 b D)        dual form: X W, X^T G, Q W (2 D^2 each), Q K^T and A G (2 b D each)
    ttt_mlp         H (14 D M + 4 b (D + M)) M = 4 D: seven D x M products per token, the mini-batch attention terms
    gated_deltanet  H (6 D^2 + 4 c D)        chunk form (c = 64): k^T S, the state update, q^T S; intra-chunk terms

Usage (GPU):  python benchmarks/model_gpu.py --budget 300 --out results/
CPU smoke:    python benchmarks/model_gpu.py --device cpu --presets micro --train-lengths 32,64 \\
                  --tokens-per-step 128 --contexts 32,64 --decode-tokens 4 --out /tmp/m
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import shlex
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ttt.models import CausalLM, LMConfig  # noqa: E402
from ttt.models.static_decode import StaticDecoder  # noqa: E402
from ttt.recipes.args import Parser
from ttt.recipes.common import parse_mixer_kwargs  # noqa: E402

MIXERS = ("ttt_linear", "attention", "ttt_mlp", "swa", "gated_deltanet")
#: dense bf16 peak by GPU name (NVIDIA datasheets, SXM parts); MFU is "n/a" for a GPU not listed
PEAK_BF16 = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12}


@dataclass
class Case:
    """One measurement; ``status`` is "ok", "OOM", "skipped: ..." or "error: ..."."""

    preset: str
    mixer: str
    phase: str  # "gate", "train", "prefill", "decode"
    length: int  # T (train) or context (prefill / decode)
    batch: int
    status: str = "ok"
    seconds: float = 0.0  # wall time of the case, warm-up and compilation included
    tokens_per_s: float | None = None
    step_ms: float | None = None
    mfu: float | None = None
    tflops: float | None = None
    peak_mb: float | None = None
    state_mb: float | None = None
    extra: dict = field(default_factory=dict)


def mixing_flops(mixer: str, config: LMConfig, T: int, window: int) -> float:
    """Forward FLOPs per token and layer of the sequence mixing (module docstring), averaged over T."""
    C, H, D = config.dim, config.n_heads, config.head_dim
    if mixer == "attention":
        return 4 * C * (T + 1) / 2
    if mixer == "swa":
        full = min(T, window)  # positions i < W see i + 1 keys, the rest W
        return 4 * C * (full * (full + 1) / 2 + (T - full) * window) / T
    b = 16
    if mixer == "ttt_linear":
        return H * (6 * D * D + 4 * b * D)
    if mixer == "ttt_mlp":
        M = 4 * D
        return H * (14 * D * M + 4 * b * (D + M))
    if mixer == "gated_deltanet":
        return H * (6 * D * D + 4 * 64 * D)
    raise ValueError(f"no FLOPs formula for mixer {mixer!r}")


def forward_flops_per_token(model: CausalLM, mixer: str, T: int, window: int) -> float:
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    return 2 * linear + model.config.n_layers * mixing_flops(mixer, model.config, T, window)


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.start = time.monotonic()
        self.cases: list[Case] = []
        self.static_mode: dict[tuple[str, str], str] = {}  # the gate's verdict on the static decoder
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.gpu = (
            torch.cuda.get_device_name(self.device) if self.cuda else f"CPU ({platform.processor() or 'cpu'})"
        )
        self.peak = next((v for k, v in PEAK_BF16.items() if k in self.gpu), None) if self.cuda else None
        self.matmul_tflops = self._matmul_rate() if self.cuda else None

    # -- helpers ---------------------------------------------------------------------------------------
    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def reset_peak(self) -> int:
        if not self.cuda:
            return 0
        torch.cuda.reset_peak_memory_stats(self.device)
        return torch.cuda.memory_allocated(self.device)

    def peak_mb(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.device) / 2**20 if self.cuda else None

    def _matmul_rate(self) -> float:
        """Measured bf16 matmul TFLOP/s (8192^3 on random data), the practical ceiling beside the peak."""
        n = 8192
        a = torch.randn(n, n, device=self.device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=self.device, dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        self.sync()
        t = time.perf_counter()
        for _ in range(10):
            a @ b
        self.sync()
        rate = 2 * n**3 * 10 / (time.perf_counter() - t) / 1e12
        del a, b
        return rate

    def timed(self, fn, repeats: int, limit: float) -> float:
        """Median seconds of ``fn`` after one warm-up call, stopping early past ``limit`` seconds."""
        t0 = time.perf_counter()
        fn()
        self.sync()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t)
            if time.perf_counter() - t0 > limit:
                break
        times.sort()
        return times[len(times) // 2]

    def guarded(self, case: Case, body) -> Case:
        """Run ``body(case)`` with the OOM / error / budget guards; record and save the case."""
        if self.elapsed() > self.args.budget:
            case.status = "skipped: budget"
        else:
            t = time.monotonic()
            try:
                body(case)
            except torch.OutOfMemoryError:
                case.status = "OOM"
            except Exception as err:  # noqa: BLE001 -- recorded, the run goes on
                msg = str(err).strip().splitlines()
                case.status = f"error: {type(err).__name__}: {msg[0][:160] if msg else ''}"
                if self.args.verbose:
                    traceback.print_exc()
            case.seconds = time.monotonic() - t
        if self.cuda:  # free what a failed or finished case left behind (gc is slow: GPU only)
            gc.collect()
            torch.cuda.empty_cache()
        self.cases.append(case)
        print(f"[{self.elapsed():6.1f}s] {case.preset:5s} {case.mixer:15s} {case.phase:8s} {case.length:>7d} "
              f"{case.status:10.60s} {_fmt(case.tokens_per_s)} tok/s {_fmt(case.peak_mb)} MB", flush=True)  # fmt: skip
        self.write()
        return case

    def build(self, preset: str, mixer: str, max_len: int) -> CausalLM:
        kwargs = {"swa": {"window": self.args.swa_window}}
        for name, extra in parse_mixer_kwargs(self.args.mixer_kwargs).items():
            kwargs[name] = {**kwargs.get(name, {}), **extra}
        config = LMConfig.from_name(preset, mixer=mixer, max_seq_len=max_len, mixer_kwargs=kwargs)
        torch.manual_seed(0)
        return CausalLM(config).to(self.device)

    # -- the phases ------------------------------------------------------------------------------------
    def gate(self, preset: str, mixer: str) -> bool:
        """Prefill + CausalLM.step == one forward, float32, on the device: a model that fails is not timed.

        The static decoder (with a CUDA graph where it can be captured, else eagerly) is checked the same
        way; where it fails, the decode phase times only the CausalLM.step path and says so."""

        def errors(
            model: CausalLM, idx: torch.Tensor, full: torch.Tensor, decoder: bool, graph: bool
        ) -> float:
            """Max |logit error| of prefill(24) + 16 steps against the forward."""
            with torch.no_grad():
                if decoder:
                    dec = StaticDecoder(model, max_len=41, cuda_graph=graph)
                    dec.prefill(idx[:, :24])
                    step = dec.step
                else:
                    _, state = model(idx[:, :24])

                    def step(token: torch.Tensor) -> torch.Tensor:
                        nonlocal state
                        logits, state = model.step(token, state)
                        return logits

                # the logits after feeding token t are the forward's at position t
                return max(float((step(idx[:, t]) - full[:, t]).abs().max()) for t in range(24, 40))

        def body(case: Case) -> None:
            model = self.build(preset, mixer, 64).eval()
            g = torch.Generator().manual_seed(0)
            idx = torch.randint(0, model.config.vocab_size, (2, 40), generator=g).to(self.device)
            with torch.no_grad():
                full, _ = model(idx)
                probe = StaticDecoder(model, max_len=41)
                probe.prefill(idx[:, :24])
            tol = self.args.gate_tol * max(1.0, float(full.abs().max()))
            err_step = errors(model, idx, full, decoder=False, graph=False)
            case.extra = {"err_step": err_step, "tol": tol, "static": "failed", "err_static": None}
            for graph in [True, False] if self.cuda and probe.graphable else [False]:
                try:
                    err = errors(model, idx, full, decoder=True, graph=graph)
                except Exception as exc:  # noqa: BLE001 -- recorded; the eager decoder is tried next
                    case.extra[f"static_error_graph_{graph}"] = f"{type(exc).__name__}: {str(exc)[:160]}"
                    continue
                if err <= tol:
                    case.extra.update(static="cuda graph" if graph else "eager", err_static=err)
                    break
                case.extra[f"static_error_graph_{graph}"] = f"max error {err:.3g} > {tol:.3g}"
            if not err_step <= tol:
                case.status = f"error: gate failed (CausalLM.step max error {err_step:.3g} > {tol:.3g})"

        case = self.guarded(Case(preset, mixer, "gate", 40, 2), body)
        self.static_mode[(preset, mixer)] = case.extra.get("static", "failed")
        return case.status == "ok"

    def train(self, preset: str, mixer: str) -> None:
        lengths = _ints(self.args.train_lengths)
        model = opt = None
        stop = ""
        for T in lengths:
            B = max(1, self.args.tokens_per_step // T)
            if stop:
                self.guarded(Case(preset, mixer, "train", T, B, status=stop), lambda c: None)
                continue

            def body(case: Case, T=T, B=B) -> None:
                nonlocal model, opt
                if model is None:
                    model = self.build(preset, mixer, max(lengths)).train()
                    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=self.cuda)
                V = model.config.vocab_size
                idx = torch.randint(0, V, (B, T + 1), device=self.device)
                self.reset_peak()

                def step() -> None:
                    with torch.autocast(self.device.type, dtype=torch.bfloat16):
                        logits, _ = model(idx[:, :-1])
                    loss = F.cross_entropy(logits.reshape(-1, V), idx[:, 1:].reshape(-1))
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)

                sec = self.timed(step, self.args.train_steps, self.args.case_limit)
                flops = 3 * forward_flops_per_token(model, mixer, T, self.args.swa_window) * B * T
                case.step_ms, case.tokens_per_s = sec * 1e3, B * T / sec
                case.tflops = flops / sec / 1e12
                case.mfu = flops / sec / self.peak if self.peak else None
                case.peak_mb = self.peak_mb()
                case.extra["impl"] = _impls(model)

            case = self.guarded(Case(preset, mixer, "train", T, B), body)
            if case.status == "OOM" or case.seconds > self.args.case_limit:
                stop = f"skipped: T={T} was {case.status if case.status != 'ok' else 'over the case limit'}"
        del model, opt

    def infer(self, preset: str, mixer: str) -> None:
        contexts = _ints(self.args.contexts)
        n = self.args.decode_tokens
        B = self.args.decode_batch
        held: dict = {}  # the model (built at the first context) and the current prompt
        stop = ""
        for ctx in contexts:
            if stop:
                for phase in ("prefill", "decode"):
                    self.guarded(Case(preset, mixer, phase, ctx, B, status=stop), lambda c: None)
                continue

            def prefill(case: Case, ctx=ctx) -> None:
                if "model" not in held:
                    dtype = getattr(torch, self.args.infer_dtype)
                    held["model"] = self.build(preset, mixer, max(contexts) + n + 2).to(dtype).eval()
                model = held["model"]
                idx = held["idx"] = torch.randint(0, model.config.vocab_size, (B, ctx), device=self.device)
                base = self.reset_peak()

                def run() -> None:
                    with torch.no_grad():
                        model(idx)

                sec = self.timed(run, self.args.prefill_repeats, self.args.case_limit / 2)
                case.step_ms, case.tokens_per_s = sec * 1e3, B * ctx / sec
                flops = forward_flops_per_token(model, mixer, ctx, self.args.swa_window) * B * ctx
                case.tflops = flops / sec / 1e12
                case.mfu = flops / sec / self.peak if self.peak else None
                case.peak_mb = self.peak_mb()
                case.extra["weights_mb"] = base / 2**20 if self.cuda else None
                case.extra["impl"] = _impls(model)

            def decode(case: Case, ctx=ctx) -> None:
                model, idx = held["model"], held["idx"]
                mode = self.static_mode.get((preset, mixer), "failed")
                case.extra["static"] = mode
                if mode != "failed":
                    dec = StaticDecoder(model, max_len=ctx + n + 2, cuda_graph=mode == "cuda graph")
                    logits = dec.prefill(idx)
                    self.reset_peak()
                    token = dec.step(logits.argmax(-1)).argmax(-1)  # captures the graph / warms up
                    self.sync()
                    t = time.perf_counter()
                    for _ in range(n):
                        token = dec.step(token).argmax(-1)
                    self.sync()
                    sec = (time.perf_counter() - t) / n
                    case.step_ms, case.tokens_per_s = sec * 1e3, B / sec
                    case.peak_mb = self.peak_mb()
                    case.state_mb = dec.state_nbytes() / 2**20
                    del dec
                # the same decode through CausalLM.step (new state objects every token)
                with torch.no_grad():
                    logits, st = model(idx)
                    token = logits[:, -1].argmax(-1)
                    logits, st = model.step(token, st)
                    self.sync()
                    t = time.perf_counter()
                    for _ in range(n):
                        logits, st = model.step(logits.argmax(-1), st)
                    self.sync()
                case.extra["step_path_ms"] = (time.perf_counter() - t) / n * 1e3

            first = self.guarded(Case(preset, mixer, "prefill", ctx, B), prefill)
            if first.status != "ok":
                self.guarded(
                    Case(preset, mixer, "decode", ctx, B, status="skipped: no prefill"), lambda c: None
                )
            else:
                second = self.guarded(Case(preset, mixer, "decode", ctx, B), decode)
                first.seconds += second.seconds
            if first.status == "OOM" or first.seconds > self.args.case_limit:
                stop = f"skipped: context {ctx} was {first.status if first.status != 'ok' else 'over the case limit'}"
            held.pop("idx", None)
        held.clear()

    def run(self) -> None:
        # mixer by mixer: a budget that runs out cuts whole mixers (the last ones), not a phase of all
        for preset in _strs(self.args.presets):
            for mixer in _strs(self.args.mixers):
                if not self.gate(preset, mixer):
                    continue
                for phase in _strs(self.args.phases):
                    getattr(self, phase)(preset, mixer)
        self.write()
        print(self.table(), flush=True)

    # -- output ----------------------------------------------------------------------------------------
    def header(self) -> str:
        import importlib.metadata as md

        def version(name: str) -> str:
            try:
                return md.version(name)
            except md.PackageNotFoundError:
                return "not installed"

        triton = version("triton")
        peak = f"{self.peak / 1e12:.1f} TFLOP/s (datasheet dense bf16)" if self.peak else "n/a"
        measured = f"{self.matmul_tflops:.0f} TFLOP/s" if self.matmul_tflops else "n/a"
        return (
            f"device: {self.gpu}; torch {torch.__version__}; triton {triton}; fla-core {version('fla-core')}; "
            f"Python {platform.python_version()}\n\n"
            f"command: `{' '.join(shlex.quote(a) for a in sys.argv)}`\n\n"
            f"MFU denominator: {peak}; measured 8192^3 bf16 matmul on this device: {measured}\n"
        )

    def table(self) -> str:
        rows = ["| preset | mixer | phase | T / context | batch | tokens/s | ms/step | MFU | peak MB | state MB | note |",
                "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
        for c in self.cases:
            note = c.status if c.status != "ok" else ""
            if c.phase == "gate" and c.status == "ok":
                static = c.extra["err_static"]
                static = f"{static:.2e} ({c.extra['static']})" if static is not None else "FAILED"
                note = f"max err CausalLM.step {c.extra['err_step']:.2e}, static decoder {static}"
            if c.phase in ("train", "prefill") and c.status == "ok" and c.extra.get("impl"):
                note = f"forms: {c.extra['impl']}"
            if c.phase == "decode" and c.status == "ok":
                static = c.extra["static"]
                static = f"static ({static})" if static != "failed" else "static decoder failed its gate"
                note = f"{static}; CausalLM.step {c.extra['step_path_ms']:.3f} ms/token"
            mfu = f"{100 * c.mfu:.1f}%" if c.mfu is not None else ""
            rows.append(f"| {c.preset} | {c.mixer} | {c.phase} | {c.length} | {c.batch} | {_fmt(c.tokens_per_s)} | "
                        f"{_fmt(c.step_ms, 3)} | {mfu} | {_fmt(c.peak_mb)} | {_fmt(c.state_mb, 2)} | {note} |")  # fmt: skip
        return "\n".join(rows)

    def write(self) -> None:
        a = self.args
        text = (
            "# Whole-model benchmark\n\n"
            + self.header()
            + f"\nTraining: bf16 autocast, AdamW, {a.tokens_per_step} tokens per step (batch = tokens / T), median "
            f"of the timed steps after one warm-up step. Prefill: {a.infer_dtype} weights, batch "
            f"{a.decode_batch}. Decode: {a.decode_tokens} tokens after a prefill of the context, "
            "ttt.models.static_decode (CUDA graph where every mixer can be captured); the "
            "CausalLM.step path timed beside it. swa window "
            f"{a.swa_window}. Elapsed {self.elapsed():.0f} s of a {a.budget:.0f} s budget.\n\n"
            + "FLOPs per token: forward = 2 x nn.Linear weights + n_layers x mixing term (benchmarks/model_gpu.py "
            "docstring); training = 3 x forward; MFU = FLOPs / time / peak.\n\n" + self.table() + "\n"
        )
        (self.out / "model_gpu.md").write_text(text)
        meta = {"device": self.gpu, "torch": torch.__version__, "argv": sys.argv, "peak_flops": self.peak,
                "matmul_tflops": self.matmul_tflops, "elapsed_s": self.elapsed()}  # fmt: skip
        (self.out / "model_gpu.json").write_text(
            json.dumps({"meta": meta, "cases": [asdict(c) for c in self.cases]}, indent=1)
        )


def _impls(model: nn.Module) -> str:
    """The operator forms the mixers' last calls ran (``last_impl``), e.g. "triton" or "fla"."""
    forms = {m.last_impl for m in model.modules() if getattr(m, "last_impl", None)}
    return ",".join(sorted(forms))


def _fmt(x: float | None, digits: int = 0) -> str:
    if x is None:
        return ""
    return f"{x:,.{digits}f}" if math.isfinite(x) else str(x)


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _strs(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--presets", default="125m,350m", help="ttt.models.config presets, in order")
    p.add_argument(
        "--mixers", default=",".join(MIXERS), help="mixers, in order (the budget may cut the last)"
    )
    p.add_argument("--phases", default="train,infer", help="train and/or infer, in order")
    p.add_argument("--train-lengths", default="2048,8192,32768")
    p.add_argument("--tokens-per-step", type=int, default=32768)
    p.add_argument("--train-steps", type=int, default=3, help="timed training steps (after one warm-up)")
    p.add_argument("--contexts", default="1024,8192,32768,131072")
    p.add_argument("--prefill-repeats", type=int, default=2)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--decode-batch", type=int, default=1)
    p.add_argument(
        "--infer-dtype",
        default="bfloat16",
        choices=["bfloat16", "float32"],
        help="weights for prefill and decode",
    )
    p.add_argument("--swa-window", type=int, default=2048)
    p.add_argument(
        "--mixer-kwargs",
        default=None,
        help='extra layer arguments per mixer, JSON as in `ttt train`, e.g. \'{"gated_deltanet": {"impl": "fla"}}\'',
    )
    p.add_argument(
        "--gate-tol", type=float, default=1e-2, help="gate: max |logit error| <= tol * max(1, max |logit|)"
    )
    p.add_argument(
        "--case-limit", type=float, default=60.0, help="seconds; a slower case skips the larger sizes"
    )
    p.add_argument("--budget", type=float, default=300.0, help="seconds; no case starts after it")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--out", default="model_gpu_out")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failed cases")
    args = p.parse(argv)
    unknown = set(_strs(args.phases)) - {"train", "infer"}
    if unknown:
        p.error(f"unknown phases {sorted(unknown)}; choose from train, infer")
    try:
        parse_mixer_kwargs(args.mixer_kwargs)
    except ValueError as err:
        p.error(str(err))
    return args


def main(argv: list[str] | None = None) -> list[Case]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    runner = Runner(args)
    runner.run()
    return runner.cases


if __name__ == "__main__":
    main()
