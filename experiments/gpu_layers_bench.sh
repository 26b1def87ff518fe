#!/usr/bin/env bash
# One device call for the layer library: every mixer's forward + backward at d 2048 x seq 4096 x batch 8, then the
# gdn preset end to end beside jax-linear-attention's gdn-hd128-1p3b trainer (same GPU, same session).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-experiments/results}
timeout 330 python3 experiments/bench_layers.py --out=$OUT --reps=3 2>&1 | grep -v Warning | grep -E '^\{|^\|' | tail -14
timeout 150 python3 experiments/bench_train.py --arch=gdn --sizes=1p3b --remat=none,dots --steps=5 \
  --out=$OUT --name=bench_train_gdn 2>&1 | grep -E '^\|' | tail -3
timeout 110 python3 -m jla.cli train --config experiments/peers/jla/gdn-hd128-1p3b.toml > $OUT/jla_gdn-hd128-1p3b.log 2>&1
echo "== jla gdn-hd128-1p3b (exit $?)"; grep -iE "tok/s" $OUT/jla_gdn-hd128-1p3b.log | tail -3
