#!/usr/bin/env bash
# One GPU session (about 7 minutes at most, each stage under its own `timeout`), in this order:
#   a) install the fla-core / flash-linear-attention wheels of .whl/ (if present) into /tmp/site
#   b) kernel tests never run on a GPU (TTT-MLP GPU cases, packed TTT-MLP, tiled D = 128, fp16 / fp32
#      TTT-Linear cases, the decode kernels) plus the interpreter-sized kernel tests on the real GPU
#   c) the fla-backend equality tests and the CUDA-graph whole-model decoder tests
#   d) `ttt train --device cuda` and `ttt generate --device cuda` smoke runs (TTT-Linear, TTT-MLP)
#   e) the whole-model benchmark (benchmarks/model_gpu.py) under a time budget
# Files (flat, at most 8) go to $OUT: session_13.log, gpu_tests_13.txt, fla_static_13.txt,
# cli_smoke_13.txt, model_gpu.md, model_gpu.json. The benchmark's table is printed last.
#
#   OUT=/some/dir bash benchmarks/gpu_session_13.sh           # on the GPU machine (device tool: carry .whl)
#   DRY=1 OUT=/tmp/s13 bash benchmarks/gpu_session_13.sh      # CPU dry run: collect-only tests, tiny sizes
# Its one run (2026-12-04, H200; benchmarks/results/gpu_tests_h200.md, model_gpu_h200.md): stage b reached
# 18 % of its tests in 95 s and stage c 3 tests in 50 s (Triton compiles each kernel variant, fla autotunes
# at the first call), so give b and c several minutes in a call of their own; the benchmark's 125m models
# took about 210 s, the 350m TTT-Linear and attention models about 95 s.
# Stage limits can be changed: T_TESTS, T_FLA, T_CLI (per command), T_BENCH (seconds), BUDGET (benchmark
# seconds), CLI_STEPS (training steps of the smoke runs).
set -u
OUT=${OUT:-gpu_out_13}
DRY=${DRY:-0}
T_TESTS=${T_TESTS:-95}
T_FLA=${T_FLA:-50}
T_CLI=${T_CLI:-25}
CLI_STEPS=${CLI_STEPS:-20}
BUDGET=${BUDGET:-150}
T_BENCH=${T_BENCH:-200}
mkdir -p "$OUT"
exec > >(tee "$OUT/session_13.log") 2>&1
stamp() { echo "== $(date -u +%H:%M:%S) $*"; }

stamp "a) wheels"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl 2>&1 | grep -v WARNING
  export PYTHONPATH=$PWD:/tmp/site
else
  export PYTHONPATH=$PWD
fi
python3 - <<'EOF'
import platform, torch
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = "none"
try:
    import fla; fv = fla.__version__
except Exception as e:
    fv = f"not importable ({type(e).__name__})"
dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA"
print(f"python {platform.python_version()} torch {torch.__version__} triton {tv} fla {fv} device {dev}")
EOF
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>/dev/null

if [ "$DRY" = 1 ]; then
  COLLECT="--collect-only"; NPROC=""; DEVICE=cpu
else
  COLLECT=""; NPROC="-n 12"; DEVICE=cuda
fi

stamp "b) kernel tests not yet run on a GPU (limit ${T_TESTS}s)"
timeout "$T_TESTS" python3 -m pytest -v $NPROC $COLLECT -p no:cacheprovider -rfE --durations=10 \
  tests/ops/ttt_mlp/test_triton.py tests/ops/ttt_linear/test_triton.py tests/ops/ttt_mlp/test_decode.py \
  tests/ops/ttt_linear/test_decode.py tests/ops/ttt_mlp/test_triton_stages.py \
  tests/ops/ttt_linear/test_triton_stages.py tests/ops/test_packed.py > "$OUT/gpu_tests_13.txt" 2>&1
echo "rc=$? (124: stopped by the limit)"
grep -c -E "PASSED" "$OUT/gpu_tests_13.txt" | sed 's/^/passed: /'
grep -E "FAILED|ERROR" "$OUT/gpu_tests_13.txt" | head -20
tail -3 "$OUT/gpu_tests_13.txt"

stamp "c) fla backend == our chunk form; CUDA-graph whole-model decoder (limit ${T_FLA}s)"
FLA_MARK="gpu"; [ "$DRY" = 1 ] && FLA_MARK="not gpu"
timeout "$T_FLA" python3 -m pytest -v $NPROC -p no:cacheprovider -rA -m "$FLA_MARK" \
  tests/ops/family/test_fla_backend.py tests/models/test_static_decode.py > "$OUT/fla_static_13.txt" 2>&1
echo "rc=$?"
grep -c PASSED "$OUT/fla_static_13.txt" | sed 's/^/passed: /'
grep -E "FAILED|ERROR" "$OUT/fla_static_13.txt" | head -20
tail -2 "$OUT/fla_static_13.txt"

stamp "d) ttt train / generate --device $DEVICE smoke runs (limit ${T_CLI}s per command)"
python3 - <<'EOF'
# a made-up corpus (no download): 12 documents of numbered lines
import pathlib
d = pathlib.Path("/tmp/ttt_corpus_13"); d.mkdir(exist_ok=True)
for i in range(12):
    lines = [f"SPEAKER {j % 3}:\nline {i}-{j}, the quick brown fox jumps over the lazy dog.\n" for j in range(60)]
    (d / f"doc{i:02d}.txt").write_text("\n".join(lines))
EOF
for mixer in ttt_linear ttt_mlp; do
  echo "-- $mixer"
  timeout "$T_CLI" python3 -m ttt.cli.main train --device "$DEVICE" --dtype bfloat16 --preset micro \
    --mixer "$mixer" --match-params none --steps "$CLI_STEPS" --batch-size 8 --context 64 --eval-every 0 \
    --eval-batches 2 --ckpt-every 0 --corpus /tmp/ttt_corpus_13 --out "/tmp/ttt_run_13_$mixer" --overwrite \
    --no-plot --no-progress 2>&1 | tail -5
  echo "train rc=${PIPESTATUS[0]}"
  timeout "$T_CLI" python3 -m ttt.cli.main generate --device "$DEVICE" --checkpoint "/tmp/ttt_run_13_$mixer" \
    --prompt "SPEAKER 1:" --max-new-tokens 48 --temperature 0 --no-stream 2>&1 | tail -4
  echo "generate rc=${PIPESTATUS[0]}"
done > "$OUT/cli_smoke_13.txt" 2>&1
cat "$OUT/cli_smoke_13.txt"

stamp "e) whole-model benchmark (budget ${BUDGET}s, limit ${T_BENCH}s)"
if [ "$DRY" = 1 ]; then
  BENCH_ARGS="--device cpu --threads 1 --presets micro --train-lengths 32,64 --tokens-per-step 128 \
    --contexts 32,64 --decode-tokens 4 --case-limit 20"
else
  BENCH_ARGS="--presets 125m,350m --train-lengths 2048,8192,32768 --tokens-per-step 32768 \
    --contexts 1024,8192,32768,131072 --decode-tokens 32 --case-limit 30"
fi
timeout "$T_BENCH" python3 benchmarks/model_gpu.py $BENCH_ARGS --budget "$BUDGET" --out "$OUT" 2>&1 \
  | grep -v "^|"
echo "rc=${PIPESTATUS[0]} (124: stopped by the limit; the results written so far are kept)"
stamp "done"
ls -la "$OUT"
# the short table last (the device tool returns the tail of the output)
sed -n '/^| preset/,$p' "$OUT/model_gpu.md" | grep -v -E "\| gate \|" | cut -c1-170
