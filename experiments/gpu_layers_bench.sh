#!/usr/bin/env bash
# Device calls for the layer library (issue 3), one or more parts per call (default: all three, ~10 minutes):
#   layers  every mixer's forward + backward at d 2048 x seq 4096 x batch 8 (bench_layers.py)
#   e2e     the gdn preset at jax-linear-attention's gdn-hd128-1p3b shape through train.py's stage (bench_train.py)
#   jla     that peer's own trainer at the same shape, for the side-by-side figure
# e.g. `bash experiments/gpu_layers_bench.sh layers e2e` (carry .whl). Everything lands in $OUT.
# e2e takes REMAT (none | dots | full), MEM_FRACTION (of the GPU's memory JAX may take; JAX's default 0.75
# leaves 20 GB of an H100 unused) and SET (bench_train.py --set overrides, e.g. SET="model.loss_chunk=512").
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-experiments/results}
parts=${*:-layers e2e jla}
for part in $parts; do case $part in
  layers) timeout 300 python3 experiments/bench_layers.py --out=$OUT --reps=3 2>&1 | grep -v Warning | grep -E '^\|' ;;
  e2e) XLA_PYTHON_CLIENT_MEM_FRACTION=${MEM_FRACTION:-0.95} timeout ${E2E_TIMEOUT:-240} python3 experiments/bench_train.py --arch=gdn --sizes=1p3b --remat=${REMAT:-none} --steps=6 --set="${SET:-}" \
         --out=$OUT --name=bench_train_gdn 2>&1 | grep -v "with mesh\|Warning" | tail -4 ;;
  jla) timeout 150 python3 -m jla.cli train --config experiments/peers/jla/gdn-hd128-1p3b.toml \
         > $OUT/jla_gdn-hd128-1p3b.log 2>&1
       echo "== jla gdn-hd128-1p3b (exit $?)"; grep -iE "tok/s" $OUT/jla_gdn-hd128-1p3b.log | tail -3 ;;
  *) echo "unknown part $part (layers | e2e | jla)"; exit 2 ;;
esac; done
