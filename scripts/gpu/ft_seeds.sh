#!/usr/bin/env bash
# Fine-tuning seed spread of fig. 7 (training.ft_seed_spread), one process per range.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=3
# MNIST: $CAMA_DATA_DIR, or the archive a device session carries (scripts/gpu/README.md)
if [ -f gpu/mnist_idx.tar.xz ]; then
  mkdir -p /tmp/data && tar xJf gpu/mnist_idx.tar.xz -C /tmp/data && export CAMA_DATA_DIR=/tmp/data
fi
PIDS=()
for r in 0.1 0.2 0.3 0.4 0.5; do
  timeout ${T:-230} python3 -m training.ft_seed_spread --device cuda --ranges $r --seeds 1 2 \
    --out "$OUT/seeds_$r.json" --table /tmp/seeds_$r.md > /tmp/seeds_$r.log 2>&1 &  # at most 8 files come back
  PIDS+=($!)
done
wait "${PIDS[@]}"
for r in 0.1 0.2 0.3 0.4 0.5; do echo "== $r"; grep -v "ft  " /tmp/seeds_$r.log | tail -30; done > "$OUT/seeds.log"
cat "$OUT/seeds.log" | grep -v "^|" | tail -40
