#!/usr/bin/env bash
# Device calls for the kernels (issue 4); everything lands in $OUT. Run from the repo root with the peers' wheels in
# .whl (carry .whl). Parts, in the order given (default: all, about 12 minutes; split them over calls):
#   tests    the kernel tests natively on the GPU (JAX_PLATFORMS=cuda)      -> kernel_tests_gpu.txt
#   gdn      the gated delta rule op: ours (pallas, xla, by stage), jla, then fla -> bench_gdn.{md,json}
#            (PREV=DIR also times an earlier checkout of the package found in DIR; FLA_JSON=F reuses fla's rows)
#   prepare  the fused chunk-prepare kernel against XLA's, alone and in the op -> bench_gdn_prepare.{md,json}
#   ternary  the ternary matmul and the decode kernel's tunable sweep        -> bench_ternary.{md,json}
# TESTS= picks test files (default all of tests/kernels), e.g. TESTS="tests/kernels/test_chunk_prepare.py".
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null \
  && export PYTHONPATH=/tmp/site:$PWD || export PYTHONPATH=$PWD
OUT=${OUT:-experiments/results}
for part in ${*:-tests gdn prepare ternary}; do case $part in
  tests)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $OUT/kernel_tests_gpu.txt 2>&1
    python3 -c "import jax; print('jax', jax.__version__, jax.devices())" >> $OUT/kernel_tests_gpu.txt 2>&1
    JAX_PLATFORMS=cuda timeout ${TESTS_TIMEOUT:-300} python3 -m pytest -p no:cacheprovider ${TESTS:-tests/kernels} \
      -q -rs 2>&1 | tail -40 >> $OUT/kernel_tests_gpu.txt
    tail -5 $OUT/kernel_tests_gpu.txt ;;
  gdn)
    timeout ${JAX_TIMEOUT:-220} python3 experiments/bench_gdn.py jax /tmp/gdn_jax.json 2>&1 | grep -v Warning | tail -20
    timeout ${STAGES_TIMEOUT:-90} python3 experiments/bench_gdn.py stages /tmp/gdn_stages.json 2>&1 | grep -v Warning | tail -4
    parts="/tmp/gdn_jax.json /tmp/gdn_stages.json"
    if [ -n "${PREV:-}" ]; then  # an earlier checkout of the package (PREV=DIR holding chimera_jax, kernels_pallas)
      GDN_IMPLS=ours-pallas GDN_PREFIX=prev- PYTHONPATH=$PREV:$PYTHONPATH timeout 120 \
        python3 experiments/bench_gdn.py jax /tmp/gdn_prev.json 2>&1 | grep -v Warning | tail -4
      parts="$parts /tmp/gdn_prev.json"
    fi
    if [ -n "${FLA_JSON:-}" ]; then cp $FLA_JSON /tmp/gdn_fla.json  # fla's rows from an earlier call
    else timeout 150 python3 experiments/bench_gdn.py fla /tmp/gdn_fla.json 2>&1 | tail -6; fi
    python3 experiments/bench_gdn.py report $OUT $parts /tmp/gdn_fla.json > /dev/null
    cat $OUT/bench_gdn.md ;;
  prepare)
    timeout ${PREPARE_TIMEOUT:-240} python3 experiments/bench_gdn_prepare.py --out $OUT ${PREPARE_ARGS:-} 2>&1 \
      | grep -v Warning | tail -30 ;;
  ternary)
    timeout ${TERNARY_TIMEOUT:-300} python3 experiments/bench_ternary.py $OUT --budget-s ${TERNARY_BUDGET:-120} 2>&1 \
      | grep -v "^{" | tail -40 ;;
  *) echo "unknown part $part (tests | gdn | prepare | ternary)"; exit 2 ;;
esac; done
