#!/usr/bin/env bash
# The gdn preset at jax-linear-attention's gdn-hd128-1p3b shape through train.py's stage, then that peer's trainer.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-experiments/results}
timeout 300 python3 experiments/bench_train.py --arch=gdn --sizes=1p3b --remat=none --steps=5 \
  --out=$OUT --name=bench_train_gdn 2>&1 | grep -vi warn | tail -4
timeout 260 python3 -m jla.cli train --config experiments/peers/jla/gdn-hd128-1p3b.toml > $OUT/jla_gdn-hd128-1p3b.log 2>&1
echo "== jla gdn-hd128-1p3b (exit $?)"; grep -iE "tok/s" $OUT/jla_gdn-hd128-1p3b.log | tail -3
