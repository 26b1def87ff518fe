#!/usr/bin/env bash
# One device call (one GPU, 16 cores) for the MQAR sweep (issue 6).
#   bash experiments/gpu_mqar.sh          the full grid, 12 training runs at a time; dense and chimera first; no run
#                                         starts after --budget_s and a run past --timeout is killed, so the call
#                                         ends within about 8 minutes. $OUT gets mqar_sweep.{md,json,png,log}.
#   bash experiments/gpu_mqar.sh probe    the recipe check (about 5 minutes): dense, d 64, (64, 4), lr 1e-2 and 3e-3,
#                                         16000 steps, 32 evals each, at vocab 8192 ($OUT/probe) and 256
#                                         ($OUT/probe_v256): the step where dense passes 95% sets --steps.
#   bash experiments/gpu_mqar.sh inproc   the grid with the in-process engine in SHARDS=4 processes (see
#                                         mqar_sweep.py: much faster for these tiny models), then one table.
# Further arguments go to experiments/mqar_sweep.py, e.g. --steps=8000 --vocab_size=256 --archs=dense,chimera, or
# --merge=experiments/results/mqar_sweep.json to add the runs of an earlier call to the table.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-experiments/results}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ "${1:-}" = probe ]; then
  shift
  PROBE="--grid=full --archs=dense --d_models=64 --settings=64x4 --lrs=1e-2,3e-3 --steps=16000 --evals=32
         --parallel=4 --timeout=420"
  for v in 8192 256; do
    dest=$OUT/probe; [ $v = 8192 ] || dest=$OUT/probe_v$v
    mkdir -p $dest
    python3 experiments/mqar_sweep.py $PROBE --vocab_size=$v --out=$dest --workdirs=/tmp/mqar_probe "$@" \
      > $dest/mqar_sweep.log 2>&1 &
  done
  wait
  for dest in $OUT/probe $OUT/probe_v256; do echo "== $dest"; grep -A4 '^Dense learning' $dest/mqar_sweep.md; done
  exit 0
fi
if [ "${1:-}" = inproc ]; then
  # N shards of the in-process engine share the GPU (~N x 9 GiB at the largest cell), each starting no run after
  # BUDGET seconds; then one table from all shards and from the --merge files given as MERGE=a.json,b.json (the
  # shards skip the runs those files already hold).
  shift
  N=${SHARDS:-4}
  for i in $(seq 0 $((N - 1))); do
    mkdir -p $OUT/shard$i
    XLA_PYTHON_CLIENT_PREALLOCATE=false python3 experiments/mqar_sweep.py --grid=full --engine=inproc \
      --shard=$i/$N --out=$OUT/shard$i --budget_s=${BUDGET:-420} --timeout=${RUN_TIMEOUT:-150} \
      ${MERGE:+--merge=$MERGE} "$@" \
      > $OUT/shard$i/mqar_sweep.log 2>&1 &
  done
  wait
  files=$(ls $OUT/shard*/mqar_sweep.json | tr '\n' ',')${MERGE:-}
  python3 experiments/mqar_sweep.py --grid=full --report_only --merge=${files%,} --out=$OUT "$@" \
    | grep -E '^(\||#|- )' | head -40
  exit 0
fi
mkdir -p $OUT
python3 experiments/mqar_sweep.py --grid=full --out=$OUT --workdirs=/tmp/mqar_sweep --parallel=12 \
  --budget_s=270 --timeout=210 "$@" > $OUT/mqar_sweep.log 2>&1
echo "== mqar sweep (exit $?)"; grep -E '^(\||#|Sweep|Not started|- )' $OUT/mqar_sweep.md | head -60
