#!/usr/bin/env bash
# One device call: the cross-shift spread (fine-tune on horizontal shift 0.2, score vertical
# shift 0.2) with the constant step and the step decayed over the last fifth of the run
# (RECIPES="constant cosine@0.2"; plain "cosine" decays over the whole run), 16 seeds each,
# 4 processes per recipe.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/cross
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
if [ -f gpu/mnist_idx.tar.xz ]; then
  mkdir -p /tmp/data && tar xJf gpu/mnist_idx.tar.xz -C /tmp/data && export CAMA_DATA_DIR=/tmp/data
fi
DEV=${DEV:-cuda}; X=${X:-}; T=${T:-400}
PIDS=()
i=0
for recipe in ${RECIPES:-constant cosine@0.2}; do
  schedule=${recipe%@*}; decay=1
  if [[ $recipe == *@* ]]; then decay=${recipe#*@}; fi
  for seeds in "0 1 2 3" "4 5 6 7" "8 9 10 11" "12 13 14 15"; do
    timeout $T python3 scripts/cross_shift_spread.py --device $DEV $X --schedule $schedule --decay $decay \
      --seeds $seeds \
      --out /tmp/cross/p$i.json > /tmp/cross/p$i.log 2>&1 &
    PIDS+=($!); i=$((i + 1))
  done
done
wait "${PIDS[@]}"
python3 - <<'PY'
import glob, json, os
merged = {}
for f in sorted(glob.glob("/tmp/cross/p*.json")):
    merged.update(json.load(open(f)))
path = os.environ.get("OUT", "/tmp/out") + "/cross_gpu.json"
json.dump(merged, open(path, "w"), indent=1, sort_keys=True)
print(len(merged), "entries ->", path)
PY
python3 scripts/cross_shift_spread.py --table --out "$OUT/cross_gpu.json"
for f in /tmp/cross/p*.log; do echo "== $f"; tail -3 "$f"; done > "$OUT/cross.log"
