#!/usr/bin/env bash
# One device call: the kernel tests natively on the GPU, then both benchmarks; everything lands in $OUT.
# Run from the repo root with the peers' wheels in .whl (carry .whl).
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $OUT/kernel_tests_gpu.txt 2>&1
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" >> $OUT/kernel_tests_gpu.txt 2>&1
JAX_PLATFORMS=cuda timeout 200 python3 -m pytest -p no:cacheprovider tests/kernels -q -rs 2>&1 | tail -40 >> $OUT/kernel_tests_gpu.txt
tail -5 $OUT/kernel_tests_gpu.txt
timeout 220 python3 experiments/bench_gdn.py jax /tmp/gdn_jax.json 2>&1 | grep -v Warning | tail -20
timeout 150 python3 experiments/bench_gdn.py fla /tmp/gdn_fla.json 2>&1 | tail -6
python3 experiments/bench_gdn.py report $OUT /tmp/gdn_jax.json /tmp/gdn_fla.json > /dev/null
timeout 120 python3 experiments/bench_ternary.py $OUT 2>&1 | grep -v "^{" | tail -30
cat $OUT/bench_gdn.md
