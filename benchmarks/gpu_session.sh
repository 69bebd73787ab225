#!/usr/bin/env bash
# One GPU session's checks and timings, each stage under its own time limit so a slow stage cannot eat
# the others: the GPU tests of the kernels, then the kernel benchmarks. Results go to $OUT (default
# ./gpu_out). fla-core / flash-linear-attention (and einops) are installed from wheels in .whl/ if
# present: `python3 -m pip download --no-deps -d .whl fla-core==0.6.0 flash-linear-attention==0.6.0 einops`
# beforehand, since GPU machines here have no internet.
#
# The stage limits add up to about 18 minutes (most of it compiling kernels), more than one device call
# (10 minutes) allows: run it as two calls, checks first, in the order of the default STAGES:
#   STAGES="mlp_tests small tests" bash benchmarks/gpu_session.sh     # at most 9 minutes
#   STAGES="mlp linear decode" bash benchmarks/gpu_session.sh         # at most 9 minutes
set -u
OUT=${OUT:-gpu_out}
# the checks that have never run on a GPU first (TTT-MLP cases, barrier paths), then the rest
STAGES=${STAGES:-"mlp_tests small tests mlp linear decode"}
mkdir -p "$OUT"
# the pip of the Python that holds torch (a bare `pip` may belong to another interpreter)
ls .whl/*.whl >/dev/null 2>&1 && python3 -m pip install --no-deps -q .whl/*.whl 2>&1 | grep -v WARNING
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
for stage in $STAGES; do
  case $stage in
    mlp_tests)  # TTT-MLP's GPU-marked tests (compiling its kernel variants takes tens of seconds each)
      timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ops/ttt_mlp 2>&1 \
        | tail -30 | tee "$OUT/gpu_tests_mlp.txt" ;;
    tests)  # every other GPU-marked test: TTT-Linear kernels, compiled loop bodies, layers on CUDA
      timeout 180 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ops tests/layers/test_cuda.py \
        --ignore=tests/ops/ttt_mlp 2>&1 | tail -30 | tee "$OUT/gpu_tests.txt" ;;
    small)  # the interpreter-sized kernel tests, on the GPU: barrier paths (TTT-MLP tiled forward forced at
            # small sizes, packed sequences) that the interpreter cannot check
      timeout 120 python3 -m pytest -q -m "not gpu" -p no:cacheprovider tests/ops/ttt_mlp/test_triton.py \
        tests/ops/ttt_linear/test_triton_stages.py tests/ops/ttt_mlp/test_triton_stages.py \
        tests/ops/ttt_mlp/test_decode.py 2>&1 | tail -20 \
        | tee "$OUT/gpu_small_tests.txt" ;;
    mlp)
      timeout 200 python3 benchmarks/kernels_ttt_mlp.py --quick --tf32 --dots auto tf32 --out "$OUT/kernels_ttt_mlp.md" 2>&1 | tail -30 ;;
    linear)
      timeout 240 python3 benchmarks/kernels_ttt_linear.py --quick --tf32 --decode --out "$OUT/kernels_ttt_linear.md" 2>&1 \
        | tail -40 ;;
    decode)
      timeout 90 python3 benchmarks/kernels_decode.py --quick --out "$OUT/kernels_decode.md" 2>&1 | tail -30 ;;
  esac
done
ls -la "$OUT"
