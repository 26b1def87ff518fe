#!/usr/bin/env bash
# The gdn preset with rematerialisation (it does not fit in 80 GB without), then the CHIMERA decode benchmark.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-experiments/results}
timeout 290 python3 experiments/bench_train.py --arch=gdn --sizes=1p3b --remat=dots --steps=5 \
  --out=$OUT --name=bench_train_gdn 2>&1 | grep -E '^\||^\{|Error' | tail -4
timeout 270 python3 experiments/bench_decode.py --out=$OUT 2>&1 | grep -vi warn | tail -12
