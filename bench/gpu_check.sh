#!/usr/bin/env bash
# The prepared GPU check, one entry point (see bench/gpu_check.py for what it builds and measures).
#
#   OUT=/dir bash bench/gpu_check.sh               # one GPU: SE-KD + SE-KD_3X (train.py, bf16, paper widths,
#                                                  # 4/2 layers) + selective_head.py shape c; ~6 min, <= 8 min
#   bash bench/gpu_check.sh --cpu-smoke            # tiny widths on CPU, the same stages end to end (~1-2 min)
#
# Writes $OUT/{gpu_check.json, gpu_check.txt, gpu_check.log, se_kd.log, se_kd_3x.log, selective_head.log,
# selective_head.json} (7 files); OUT unset: out/gpu_check. Needs only torch, transformers, tokenizers and
# safetensors (installs nothing, never touches the network). Extra flags go to gpu_check.py (--steps N,
# --budget-s S, --keep-work, --work DIR, --skip-selective-head). GPU_CHECK_TIMEOUT (s) is the hard stop.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-$(command -v python || command -v python3)}"
case " $* " in
  *" --cpu-smoke "*) LIMIT="${GPU_CHECK_TIMEOUT:-240}" ;;
  *) LIMIT="${GPU_CHECK_TIMEOUT:-480}" ;;
esac
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
start=$(date +%s)
# the python script keeps its own budget (450 s on GPU); timeout is the backstop, then a hard kill 15 s later
timeout -k 15 "$LIMIT" "$PY" bench/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
rc=${PIPESTATUS[0]}
echo "gpu_check.sh: exit $rc after $(( $(date +%s) - start ))s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit "$rc"
