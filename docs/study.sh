#!/usr/bin/env bash
# The small-scale replication of docs/results.md: every table as a --matrix over 3 seeds, on the
# offline default world (SmolLM2-135M-Instruct teacher, its 8-layer student, the stdlib corpus).
# Resumable: rerun it after a kill and finished runs are skipped. About 90 min on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/study}
# --dtype fp32: the published numbers on any CPU (auto picks bf16 where the CPU has bf16 units)
# --seq-len 256 --batch-size 4: the shape the published study ran at
FLAGS=(--tokens 24576 --eval-tokens 4096 --seq-len 256 --batch-size 4 --entropy-chunk 128 --dtype fp32 --selective-head --no-save-model
       --log-every 8 --seeds 0,1,2 --out-dir "$OUT")
for m in table2 table3 table4 budget; do
  python train.py --matrix "$m" "${FLAGS[@]}"
done
