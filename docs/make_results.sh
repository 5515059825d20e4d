#!/usr/bin/env bash
# Tables and figures of docs/results.md from the runs of docs/study.sh (OUT=out/study by default).
# Every table row is mean ± sample std over seeds 0,1,2; Δ columns are per-seed differences to Full KD.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/study}
DOC=${DOC:-docs/results}
dirs() {  # run dirs of the named matrices' configurations (or single run names), in table order
  python - "$OUT" "$@" <<'PY'
import sys
try:
    from study import MATRICES  # the matrix definitions (train.py's before the study.py split)
except ImportError:
    from train import MATRICES
out, names = sys.argv[1], []
for m in sys.argv[2:]:
    names += [n for n, _ in MATRICES[m]] if m in MATRICES else [m]
print(" ".join(f"{out}/{n}/seed{s}" for n in names for s in (0, 1, 2)))
PY
}
mkdir -p "$DOC"
python report.py --compare $(dirs table2) --compare-baseline full_kd --compare-out "$DOC/table2.md" > /dev/null
python report.py --compare $(dirs full_kd table3) --compare-baseline full_kd --compare-out "$DOC/table3.md" > /dev/null
python report.py --compare $(dirs full_kd table4) --compare-baseline full_kd --compare-out "$DOC/table4.md" > /dev/null
python report.py --compare $(dirs budget random_pos_20 random_smp_20) --compare-baseline k1.0 --compare-out "$DOC/budget.md" > /dev/null
for metric in loss kl; do
  python report.py --plot "$DOC/k_sweep_$metric.png" --plot-kind budget --plot-metric $metric $(dirs k0.05 k0.1 k0.2 k0.5 k1.0 random_pos_20) > /dev/null
  python report.py --plot "$DOC/l_sweep_$metric.png" --plot-kind budget --plot-metric $metric $(dirs l0.1 l0.2 l0.5 k1.0 random_smp_20) > /dev/null
done
# the runs themselves (config, summary, per-step metrics), so a rerun can be diffed against them
for d in "$OUT"/*/seed*; do
  [ -f "$d/summary.json" ] || continue
  rel=${d#"$OUT"/}; mkdir -p "$DOC/runs/$rel"
  cp "$d/config.json" "$d/summary.json" "$d/metrics.jsonl" "$DOC/runs/$rel/"
done
echo "wrote $DOC"
