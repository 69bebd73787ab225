#!/usr/bin/env bash
# Makes benchmarks/results/lm_tiny_cpu.md: `ttt train` on the default corpus (Shakespeare, bytes) with the
# tiny preset for TTT-Linear, TTT-MLP, Gated DeltaNet and attention at equal parameters (--match-params
# attention, the default) and equal steps, each run pinned to its own 2 CPU cores (taskset) with 2 threads,
# the four runs side by side. The step count is chosen so that the slowest mixer trains in BUDGET_S
# seconds: a short calibration run of every mixer measures seconds per step first.
# Then: decode speed after a 256-token and a 4096-token prompt (greedy, 256 new tokens), and the
# validation loss by position at a 1024-token context.
#
#   bash benchmarks/results/lm_tiny_cpu.sh            # about 8 minutes on a machine with 8 free cores
#   PIN=0 PRESET=micro BUDGET_S=20 CAL_STEPS=2 bash benchmarks/results/lm_tiny_cpu.sh   # a quick dry run
set -uo pipefail
PRESET=${PRESET:-tiny}
BUDGET_S=${BUDGET_S:-300}
CAL_STEPS=${CAL_STEPS:-10}
RESULTS=${RESULTS:-lm_runs}
MIXERS=${MIXERS:-"ttt_linear ttt_mlp gated_deltanet attention"}
NEW_TOKENS=${NEW_TOKENS:-256}
LONG_EVAL=${LONG_EVAL:-1}
TTT="python3 -m ttt.cli.main"
mkdir -p "$RESULTS"

# PIN=0: no taskset (a machine with fewer than 8 cores; timings then interfere)
pin() {
  local i=$1; shift
  if [ "${PIN:-1}" = 0 ]; then "$@"; else taskset -c $((2 * i)),$((2 * i + 1)) "$@"; fi
}
TIMEFORMAT="%R s wall"

i=0
for m in $MIXERS; do
  pin $i $TTT train --preset "$PRESET" --mixer "$m" --steps "$CAL_STEPS" --eval-every 100000 --eval-batches 1 \
    --out "$RESULTS/cal-$m" --overwrite --threads 2 --no-progress --no-plot >"$RESULTS/cal-$m.log" 2>&1 &
  i=$((i + 1))
done
wait
STEPS=$(python3 - "$RESULTS" "$BUDGET_S" $MIXERS <<'PY'
import json, sys
results, budget, mixers = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
per_step = max(json.load(open(f"{results}/cal-{m}/result.json"))["seconds"] / json.load(open(f"{results}/cal-{m}/result.json"))["step"] for m in mixers)
print(max(20, int(budget / per_step) // 20 * 20))
PY
)
echo "calibration done: $STEPS steps for every mixer"

i=0
for m in $MIXERS; do
  ( time pin $i $TTT train --preset "$PRESET" --mixer "$m" --steps "$STEPS" \
      --eval-every $((STEPS / 4)) --ckpt-every "$STEPS" --out "$RESULTS/$m" --overwrite --threads 2 --no-progress
    for n in 256 4096; do
      pin $i $TTT generate --checkpoint "$RESULTS/$m" --prompt-tokens $n --max-new-tokens "$NEW_TOKENS" --temperature 0 \
        --no-stream --threads 2 >"$RESULTS/$m/gen-$n.txt"
    done
    [ "$LONG_EVAL" = 1 ] && pin $i $TTT eval --checkpoint "$RESULTS/$m" --context 1024 --batch-size 4 --max-batches 8 --bins 8 --threads 2 \
      --out "$RESULTS/$m/eval1024"
  ) >"$RESULTS/$m.log" 2>&1 &
  i=$((i + 1))
done
wait
for m in $MIXERS; do echo "== $m"; grep -E "^model|^final|s wall|tokens/s|validation" "$RESULTS/$m.log"; done
