#!/usr/bin/env bash
# The prepared GPU session: what needs a GPU, in priority order, as two device calls that fit one lease of
# 15 minutes of H200 time (machine start included). Every stage runs under its own `timeout`: SIGINT at its
# limit (pytest still prints each failure's traceback and its summary), KILL 20 s later. A call's stages
# end RESERVE seconds before LIMIT whatever they do, so its files always come back. Every failure is named,
# with its assertion, in a small file under $OUT (pytest -vv -rfEs --tb=short: no bare `F`).
#
# The 15 minutes:
#   machine start (first call)                                                      ~1.5 min
#   call 1  CALL=1, LIMIT=420, timeout_s 440: correctness                            <= 7.3 min
#           t1_mlp    TTT-MLP on the GPU: test_chunk_fp16 (failed once, cause not kept) first, the `gpu`
#                     chunk cases (D = 128 / M = 512 through the tiled forward among them), packed
#                     sequences (gpu_varlen), the decode kernels, the CUDA-graph whole-model decoders
#           t2_linear TTT-Linear `gpu` chunk cases in bf16 / fp16 / fp32, its decode kernels, the layer
#           t3_fla    fla-core's compiled kernels == our chunk form, all eleven family rules (kernel_equals)
#           t4_rest   the interpreter-sized kernel tests (stages, packed, dot modes) compiled, and the
#                     layers on CUDA, with whatever time is left
#   call 2  CALL=2, LIMIT from `status` (below), timeout_s LIMIT + 20: the CLI and speed  ~4.5 min
#           c1_cli    `ttt train --device cuda` + `ttt generate --device cuda`, TTT-Linear and TTT-MLP
#           bench_fla 125m / 350m Gated DeltaNet on fla's kernels (`impl="fla"`), train + prefill + decode
#           bench_mlp 125m TTT-MLP training at T = 8k, 32k (cut last time by the compile-inclusive case limit)
#           bench_350m 350m TTT-MLP, swa and Gated DeltaNet (PyTorch chunk form), all phases
#   a second machine start, only if the machine went back between the calls (it stays warm 30 s)  ~1.5 min
# So: issue call 2 at once when call 1 returns (its files are already copied back; read them afterwards).
#
# With the device tool (the machine reaches no network, so fla-core travels as a wheel; .whl/ is
# gitignored and about 1 MB, far under the 64 MiB that may travel):
#   here, once:  bash benchmarks/gpu_session.sh prepare
#   call 1:      run(command="CALL=1 bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=440)
#   call 2:      status first; LIMIT = budget_left_s - 60 if warm, budget_left_s - 160 if not (a start),
#                at most 560; then
#                run(command="CALL=2 LIMIT=<that> bash benchmarks/gpu_session.sh", carry=[".whl"],
#                    timeout_s=<that + 20>); then give_back.
#   a rerun of call 1 reuses its compiled kernels and fla's autotuning: copy triton_cache.tgz from call 1's
#   files to .tcache/ (gitignored) and add ".tcache" to carry.
#   CPU dry run of every command line, path and pytest selection (collect-only with counts, the CLI and
#   the benchmark at tiny sizes; exits non-zero if anything is wrong):
#                DRY=1 CALL=1 bash benchmarks/gpu_session.sh && DRY=1 CALL=2 bash benchmarks/gpu_session.sh
#   after a kernel change (not part of the plan above): CALL=kernels, the kernel benchmarks (--quick).
# What each result settles: docs/kernels.md, "The next GPU session".
set -u
CALL=${CALL:-${1:-}}
DRY=${DRY:-0}
OUT=${OUT:-gpu_out}
NPROC=${NPROC:-14}       # pytest-xdist workers (16 cores; Triton compiles on the CPU)
RESERVE=${RESERVE:-25}   # seconds kept at the end of a call (summary, compiled-kernel archive)
CACHE=/tmp/ttt_triton_cache  # absolute: Triton's cache index holds absolute paths
T0=$(date +%s)
FAILED=0                 # dry run: any wrong command line, path or empty selection

case $CALL in
  prepare)
    # here, with a package registry: the wheels the device machine lacks (its image has torch, triton,
    # einops, pytest, pytest-xdist; fla-core is pure Python and needs only einops)
    rm -f .whl/fla_core-*.whl
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl fla-core==0.6.0 || exit 1
    git check-ignore -q .whl/ || { echo ".whl/ is not ignored by git: add it to .gitignore"; exit 1; }
    du -sh .whl; ls .whl
    exit 0 ;;
  1) LIMIT=${LIMIT:-420} ;;
  2) LIMIT=${LIMIT:-270} ;;
  kernels) LIMIT=${LIMIT:-560} ;;
  *) echo "usage: CALL=1|2|kernels [DRY=1] bash benchmarks/gpu_session.sh, or: bash benchmarks/gpu_session.sh prepare"
     exit 2 ;;
esac

mkdir -p "$OUT"
exec > >(tee "$OUT/session_call$CALL.log") 2>&1
stamp() { echo "== $(date -u +%H:%M:%S) +$(( $(date +%s) - T0 ))s $*"; }
left() { echo $(( T0 + LIMIT - RESERVE - $(date +%s) )); }
# limit CAP: the stage's cap, cut to what is left of the call
limit() { local l; l=$(left); (( l < 1 )) && l=1; (( l < $1 )) && echo "$l" || echo "$1"; }

stamp "setup (CALL=$CALL DRY=$DRY LIMIT=${LIMIT}s)"
export PYTHONUNBUFFERED=1 COLUMNS=200 TRITON_CACHE_DIR=$CACHE
export PYTHONPATH=$PWD
if ls .whl/*.whl >/dev/null 2>&1; then
  if [ "$DRY" = 1 ]; then
    echo "wheels to install there: $(ls .whl)"
  else
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl 2>&1 | grep -v WARNING
    export PYTHONPATH=$PWD:/tmp/site
  fi
else
  echo "WARNING: no .whl/*.whl: fla-core will be missing on the device (run: bash benchmarks/gpu_session.sh prepare)"
  [ "$DRY" = 1 ] && FAILED=1
fi
if [ -f .tcache/triton_cache.tgz ] && [ "$DRY" != 1 ]; then
  mkdir -p "$CACHE" && tar xzf .tcache/triton_cache.tgz -C / && echo "compiled kernels from .tcache: $(find "$CACHE" -type f | wc -l) files"
fi
python3 - <<'EOF'
import platform, torch
from importlib.metadata import version
def ver(name):
    try:
        return version(name)
    except Exception as e:
        return f"not installed ({type(e).__name__})"
dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA"
print(f"python {platform.python_version()} torch {torch.__version__} triton {ver('triton')} "
      f"fla-core {ver('fla-core')} pytest-xdist {ver('pytest-xdist')} device {dev}")
EOF
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>/dev/null

# pytest-xdist (on the image): work stealing (3.2+) keeps neighbouring tests, which share kernel variants,
# on one worker, so each variant compiles once per worker rather than on every worker at the same time
XDIST=""
if [ "$DRY" != 1 ]; then
  XDIST=$(python3 - "$NPROC" <<'EOF'
import sys
from importlib.metadata import version
try:
    v = tuple(int(x) for x in version("pytest-xdist").split(".")[:2])
except Exception:  # not installed, or an odd version string: one process
    sys.exit(0)
print(f"-n {sys.argv[1]} --dist {'worksteal' if v >= (3, 2) else 'load'}")
EOF
  )
  echo "pytest workers: ${XDIST:-none (pytest-xdist missing: one process)}"
fi
DEVICE=cuda; [ "$DRY" = 1 ] && DEVICE=cpu
PYTEST_INT='import signal, sys, pytest; signal.signal(signal.SIGINT, signal.default_int_handler); sys.exit(pytest.main(sys.argv[1:]))'

# pytest_stage NAME CAP ARGS...: one pytest run under min(CAP, time left); everything in $OUT/NAME.txt
pytest_stage() {
  local name=$1 cap=$2 lim rc t n
  local common=(-p no:cacheprovider -rfEs --tb=short --durations=30 --durations-min=2)
  shift 2
  if [ "$DRY" = 1 ]; then  # the same command, collecting only (-q, and no xdist here)
    python3 -c "$PYTEST_INT" --collect-only -q "${common[@]}" "$@" > "$OUT/$name.txt" 2>&1
    rc=$?
    n=$(grep -oE '^[0-9]+(/[0-9]+)? tests? collected' "$OUT/$name.txt" | grep -oE '^[0-9]+')
    echo "$name: ${n:-0} tests selected (collect rc=$rc)"
    if [ "$rc" != 0 ] || [ "${n:-0}" = 0 ]; then
      FAILED=1; grep -E "ERROR|error|not found" "$OUT/$name.txt" | head -5
    fi
    return
  fi
  lim=$(limit "$cap")
  if (( lim < 30 )); then stamp "$name: skipped, ${lim}s left"; return; fi
  stamp "$name (limit ${lim}s)"
  t=$(date +%s)
  # pytest under a handler for SIGINT set here: a shell that started this script in the background may
  # have it ignored, and then pytest would die at the KILL with no summary
  timeout -s INT -k 20 "$lim" python3 -c "$PYTEST_INT" -vv $XDIST "${common[@]}" "$@" > "$OUT/$name.txt" 2>&1
  rc=$?
  echo "$name: rc=$rc (124: cut by its limit) in $(( $(date +%s) - t ))s; compiled kernels cached:" \
    "$(find "$CACHE" -name '*.cubin' 2>/dev/null | wc -l)"
  grep -E "^(FAILED|ERROR) " "$OUT/$name.txt" | cut -c1-400
  # selected (xdist: "[N items]", else "collected N items") against the final counts; the rest was not reached
  echo "$name selected: $(grep -m1 -oE '\[[0-9]+ items?\]|collected [0-9]+ items?' "$OUT/$name.txt");" \
    "result: $(grep -E '^=+ .*(passed|failed|error|skipped|no tests ran).* =+$' "$OUT/$name.txt" | tail -1 \
    | sed -E 's/^=+ | =+$//g')"
}

# run_cmd NAME CAP CMD...: a command under min(CAP, time left), output to the session log
run_cmd() {
  local name=$1 cap=$2 lim rc t
  shift 2
  lim=$(limit "$cap")
  if (( lim < 20 )); then echo "$name: skipped, ${lim}s left"; [ "$DRY" = 1 ] && FAILED=1; return; fi
  t=$(date +%s)
  timeout -s INT -k 10 "$lim" "$@" 2>&1 | grep -v -E "^\|" | tail -n 25
  rc=${PIPESTATUS[0]}
  echo "$name: rc=$rc (124: cut by its limit) in $(( $(date +%s) - t ))s"
  [ "$DRY" = 1 ] && [ "$rc" != 0 ] && FAILED=1
  return 0
}

MLP=tests/ops/ttt_mlp/test_triton.py
LIN=tests/ops/ttt_linear/test_triton.py

if [ "$CALL" = 1 ]; then
  pytest_stage t1_mlp 140 \
    $MLP::test_chunk_fp16 $MLP::test_gpu_chunk $MLP::test_gpu_varlen tests/ops/ttt_mlp/test_decode.py \
    tests/models/test_static_decode.py::test_cuda_graph_decoder_equals_model_step
  pytest_stage t2_linear 80 \
    $LIN::test_gpu_chunk tests/ops/ttt_linear/test_decode.py \
    tests/layers/test_cuda.py::test_ttt_linear_triton_matches_chunk
  # fla autotunes every kernel at its first call (cached on disk, FLA_CACHE_RESULTS=1 by default)
  pytest_stage t3_fla 150 -m gpu -k kernel_equals tests/ops/family/test_fla_backend.py
  pytest_stage t4_rest 400 \
    $MLP $LIN tests/ops/ttt_mlp/test_triton_stages.py tests/ops/ttt_linear/test_triton_stages.py \
    tests/ops/test_packed.py tests/layers/test_cuda.py::test_step_loop_equals_forward_on_cuda \
    --deselect $MLP::test_chunk_fp16 --deselect $MLP::test_gpu_chunk --deselect $MLP::test_gpu_varlen \
    --deselect $LIN::test_gpu_chunk
  if [ "$DRY" != 1 ] && [ -d "$CACHE" ]; then
    # compiled kernels and fla's autotuning results, for a rerun (.tcache/); the IR files are left out
    tar czf "$OUT/triton_cache.tgz" --exclude='*.ttir' --exclude='*.ttgir' --exclude='*.llir' \
      --exclude='*.ptx' --exclude='*.source' -P "$CACHE" 2>/dev/null
    size=$(stat -c %s "$OUT/triton_cache.tgz")
    (( size > 15000000 )) && { rm "$OUT/triton_cache.tgz"; echo "triton cache over 15 MB: not kept"; }
  fi
fi

if [ "$CALL" = 2 ]; then
  stamp "c1_cli: ttt train / generate --device $DEVICE, TTT-Linear and TTT-MLP side by side"
  python3 - <<'EOF'
# a made-up corpus (no download): 12 documents of numbered lines
import pathlib
d = pathlib.Path("/tmp/ttt_gpu_corpus"); d.mkdir(exist_ok=True)
for i in range(12):
    lines = [f"SPEAKER {j % 3}:\nline {i}-{j}, the quick brown fox jumps over the lazy dog.\n" for j in range(60)]
    (d / f"doc{i:02d}.txt").write_text("\n".join(lines))
EOF
  STEPS=20; NEW=48; [ "$DRY" = 1 ] && { STEPS=2; NEW=4; }
  cli() {  # train then generate one mixer; TTT-MLP's first run compiles its kernels (cut at 25 s last time)
    timeout -s INT -k 10 "$(limit 130)" python3 -m ttt.cli.main train --device "$DEVICE" --dtype bfloat16 \
      --preset micro --mixer "$1" --match-params none --steps "$STEPS" --batch-size 8 --context 64 \
      --eval-every 0 --eval-batches 2 --ckpt-every 0 --corpus /tmp/ttt_gpu_corpus --out "/tmp/ttt_gpu_run_$1" \
      --overwrite --no-plot --no-progress 2>&1 | tail -n 4
    echo "$1 train rc=${PIPESTATUS[0]}"
    timeout -s INT -k 10 "$(limit 40)" python3 -m ttt.cli.main generate --device "$DEVICE" \
      --checkpoint "/tmp/ttt_gpu_run_$1" --prompt "SPEAKER 1:" --max-new-tokens "$NEW" --temperature 0 \
      --no-stream 2>&1 | tail -n 4
    echo "$1 generate rc=${PIPESTATUS[0]}"
  }
  cli ttt_linear > /tmp/ttt_gpu_cli_linear.txt 2>&1 &
  pid=$!
  cli ttt_mlp > /tmp/ttt_gpu_cli_mlp.txt 2>&1
  wait "$pid"  # not a bare `wait`: that also waits for the log's `tee`, which never ends
  cat /tmp/ttt_gpu_cli_linear.txt /tmp/ttt_gpu_cli_mlp.txt
  if [ "$DRY" = 1 ] && [ "$(grep -c ' rc=0$' /tmp/ttt_gpu_cli_linear.txt /tmp/ttt_gpu_cli_mlp.txt \
      | awk -F: '{s += $2} END {print s}')" != 4 ]; then FAILED=1; fi

  if [ "$DRY" = 1 ]; then
    P125=micro; P350=micro; LONG=64,128
    SIZES="--device cpu --threads 1 --train-lengths 32,64 --tokens-per-step 128 --contexts 32,64 --decode-tokens 4"
  else
    P125=125m; P350=350m; LONG=8192,32768
    SIZES="--train-lengths 2048,8192,32768 --tokens-per-step 32768 --contexts 1024,8192,32768,131072 --decode-tokens 32"
  fi
  # bench NAME CAP ARGS...: benchmarks/model_gpu.py into $OUT/NAME/ (results written after every case);
  # its --budget stops starting cases 40 s before the stage's limit
  bench() {
    local name=$1 lim
    lim=$(limit "$2")
    shift 2
    stamp "$name (limit ${lim}s)"
    run_cmd "$name" "$lim" python3 benchmarks/model_gpu.py $SIZES --budget $(( lim > 60 ? lim - 40 : 20 )) \
      --out "$OUT/$name" "$@"
  }
  # the family on fla's kernels: the comparison with flash-linear-attention; fla autotunes inside the first
  # case of each phase, hence the case limit (DRY: fla under the Triton interpreter)
  if [ "$DRY" = 1 ]; then
    TRITON_INTERPRET=1 bench bench_fla 150 --presets $P125 --mixers gated_deltanet --case-limit 120 \
      --mixer-kwargs '{"gated_deltanet": {"impl": "fla"}}'
  else
    bench bench_fla 150 --presets $P125,$P350 --mixers gated_deltanet --case-limit 120 \
      --mixer-kwargs '{"gated_deltanet": {"impl": "fla"}}'
  fi
  # TTT-MLP training past 2k (its kernels compile inside the first case: a generous case limit)
  bench bench_mlp 100 --presets $P125 --mixers ttt_mlp --phases train --train-lengths $LONG \
    --case-limit 120
  bench bench_350m 400 --presets $P350 --mixers ttt_mlp,swa,gated_deltanet --case-limit 60
  for f in "$OUT"/bench_*/model_gpu.md; do
    [ -f "$f" ] || continue
    echo "-- $f"
    sed -n '/^| preset/,$p' "$f" | cut -c1-200
  done
fi

if [ "$CALL" = kernels ]; then
  # kernel timings (`--quick`), for after a kernel change; their own float64 gates run first
  kb() {
    local name=$1 cap=$2
    shift 2
    if [ "$DRY" = 1 ]; then  # each flag must be one the script knows
      local help; help=$(python3 "$1" --help 2>&1)
      for a in "$@"; do
        case $a in --*) grep -q -- "$a" <<<"$help" || { echo "$name: unknown flag $a"; FAILED=1; } ;; esac
      done
      echo "$name: flags ok"
      return
    fi
    stamp "$name"
    run_cmd "$name" "$cap" python3 "$@"
  }
  kb k_mlp 200 benchmarks/kernels_ttt_mlp.py --quick --tf32 --dots auto tf32 --out "$OUT/kernels_ttt_mlp.md"
  kb k_linear 240 benchmarks/kernels_ttt_linear.py --quick --tf32 --out "$OUT/kernels_ttt_linear.md"
  kb k_decode 90 benchmarks/kernels_decode.py --quick --out "$OUT/kernels_decode.md"
fi

stamp "done"
ls -la "$OUT"
if [ "$DRY" = 1 ]; then
  [ "$FAILED" = 0 ] && echo "DRY RUN OK" || echo "DRY RUN FAILED"
  exit "$FAILED"
fi
