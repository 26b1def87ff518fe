#!/usr/bin/env bash
# One device call: chimera_jax's dense LM presets and jax-linear-attention's trainer on the same GPU, same session.
#   run with the wheels of ../shared/tools/device_wheels.sh peers carried in .whl
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-experiments/results}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/gpu.txt
python3 experiments/bench_train.py --arch=dense --sizes=125m,350m,1p3b --remat=none,dots --steps=10 \
  --out=$OUT --name=bench_train_dense 2>&1 | grep -v Warning | tail -20
for preset in transformer-350m transformer-1p3b; do
  timeout 240 python3 -m jla.cli train --config experiments/peers/jla/$preset.toml > $OUT/jla_$preset.log 2>&1
  echo "== jla $preset (exit $?)"; grep -iE "tok|mfu|step" $OUT/jla_$preset.log | tail -4
done
