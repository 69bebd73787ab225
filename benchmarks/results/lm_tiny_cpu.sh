#!/usr/bin/env bash
# Makes the figures of benchmarks/results/lm_tiny_cpu.md on a 2-core CPU:
#  1. `ttt train` on the default corpus (Shakespeare plays, bytes) with the tiny preset and the default
#     600 steps for TTT-Linear, TTT-MLP, Gated DeltaNet and attention, one after the other, 2 threads;
#     every mixer gets the attention model's parameter count (--match-params attention, the default);
#  2. `ttt eval` of each final checkpoint on 64 validation batches of 16 x 128 bytes;
#  3. `ttt generate` decode speed (1 thread, greedy, 256 new tokens) after a 256- and a 4096-token prompt;
#  4. lm_tiny_cpu_plot.py: validation curves of the four runs in one PNG.
#
#   bash benchmarks/results/lm_tiny_cpu.sh [RESULTS_DIR]       # ~20 minutes on 2 idle cores
set -euo pipefail
RESULTS=${1:-runs/lm_tiny_cpu}
MIXERS=${MIXERS:-"ttt_linear ttt_mlp gated_deltanet attention"}
TTT="python3 -m ttt.cli.main"
TIMEFORMAT="%R s wall"
mkdir -p "$RESULTS"
for m in $MIXERS; do
  { time $TTT train --mixer "$m" --threads 2 --out "$RESULTS/$m" --overwrite --no-progress ; } 2>&1 | tee "$RESULTS/$m.log"
  $TTT eval --checkpoint "$RESULTS/$m" --batch-size 16 --max-batches 64 --threads 2 | tee -a "$RESULTS/$m.log"
done
for rep in 1 2; do
  for m in $MIXERS; do
    for n in 256 4096; do
      echo "$rep $m $n $($TTT generate --checkpoint "$RESULTS/$m" --prompt-tokens $n --max-new-tokens 256 \
        --temperature 0 --no-stream --threads 1 2>&1 >/dev/null | tail -1)"
    done
  done
done | tee "$RESULTS/decode.txt"
python3 "$(dirname "$0")/lm_tiny_cpu_plot.py" "$RESULTS" $MIXERS
