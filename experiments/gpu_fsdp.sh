#!/usr/bin/env bash
# One device call on a 2-GPU machine (device kind nvidia-h200-x2): the same train.py on one GPU and on both GPUs with
# FSDP (one process), then the scaling table. Per-GPU batch 8 x 2048 tokens, synthetic data, bf16, dense 1p3b.
# Each run is stopped (SIGKILL) once its metrics hold step $STEPS: only the training rate is wanted, and the final
# eval and the 19 GB checkpoint would cost more device time than the steps. MODE=2proc adds the two-process run.
#   run with the wheels of ../shared/tools/device_wheels.sh carried in .whl
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-experiments/results}
RUNS=/tmp/fsdp_runs
STEPS=${STEPS:-25}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/gpu.txt
common=(--config=configs/lm.py:arch=dense,size=1p3b --config.data.source=synthetic --config.data.seq_len=2048
        --config.total_steps=1000 --config.log_every=5 --config.eval_every=100000 --config.checkpoint_every=100000
        --config.data.eval_batches=1 --config.optimizer.warmup_steps=5)
run() {  # name, then the command; stops it once metrics.jsonl holds step $STEPS
  local name=$1; shift
  local t0=$(date +%s)
  "$@" > $RUNS/$name.log 2>&1 &
  local pid=$!
  while kill -0 $pid 2>/dev/null && ! grep -qs "\"step\": $STEPS," $RUNS/$name/metrics.jsonl; do sleep 1; done
  kill -9 $pid 2>/dev/null; pkill -9 -f "workdir=$RUNS/$name" 2>/dev/null; wait $pid 2>/dev/null
  echo "== $name done in $(( $(date +%s) - t0 )) s"; grep -v -i warn $RUNS/$name.log | grep -E "Error|error:" | tail -3
  python3 experiments/fsdp_report.py --runs=$RUNS --out=$OUT | tail -6
}
mkdir -p $RUNS
run gpu1 env CUDA_VISIBLE_DEVICES=0 python3 -m chimera_jax.train "${common[@]}" --workdir=$RUNS/gpu1 \
  --config.data.batch_size=8 --config.mesh.data=1 --config.mesh.fsdp=1
run gpu2_fsdp python3 -m chimera_jax.train "${common[@]}" --workdir=$RUNS/gpu2_fsdp \
  --config.data.batch_size=16 --config.mesh.data=1 --config.mesh.fsdp=2
if [ "${MODE:-}" = 2proc ]; then
  port=$(( 20000 + RANDOM % 20000 ))
  run gpu2_2proc bash -c "for i in 0 1; do CUDA_VISIBLE_DEVICES=\$i python3 -m chimera_jax.train ${common[*]} \
    --workdir=$RUNS/gpu2_2proc --config.data.batch_size=16 --config.mesh.data=1 --config.mesh.fsdp=2 \
    --coordinator_address=127.0.0.1:$port --num_processes=2 --process_id=\$i > $RUNS/gpu2_2proc.p\$i.log 2>&1 & done; wait"
fi
for f in gpu1 gpu2_fsdp; do grep -v -i warn $RUNS/$f.log | tail -40 > $OUT/fsdp_$f.log; done
