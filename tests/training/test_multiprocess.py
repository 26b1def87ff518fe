"""Two local processes (jax.distributed on loopback, gloo collectives) train on one mesh and checkpoint;
a single process then restores that checkpoint and trains on."""
import os
import socket
import subprocess
import sys

import numpy as np

from chimera_jax.training import checkpointing
from chimera_jax.training.metrics import read_metrics
from tests.lm_testing import REPO, cli

ARGS = ["--config=configs/lm.py:arch=dense,size=tiny", "--config.log_every=1", "--config.eval_every=4",
        "--config.checkpoint_every=4", "--config.optimizer.warmup_steps=1", "--config.model.num_layers=1",
        "--config.model.d_model=32", "--config.model.ffn_dim=64", "--config.model.attention.head_dim=8",
        "--config.data.seq_len=16", "--config.data.batch_size=8", "--config.data.eval_batches=1",
        "--config.checkpoint.async_save=False", "--config.mesh.data=2", "--config.mesh.fsdp=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_and_one_restores(tmp_path):
    workdir = str(tmp_path / "w")
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs = [subprocess.Popen([sys.executable, "-m", "chimera_jax.train", *ARGS, "--config.total_steps=4",
                               f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{port}",
                               "--num_processes=2", f"--process_id={i}"],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    assert checkpointing.Checkpointer(workdir).latest_step() == 4
    step, params, _ = checkpointing.restore_params(workdir)
    assert step == 4 and np.isfinite(np.asarray(params["embedding"])).all()
    # One process with 4 devices of its own resumes the 4-device run and trains to step 6.
    cli("chimera_jax.train", *ARGS, "--config.total_steps=6", f"--workdir={workdir}",
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    losses = {r["step"]: r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r}
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and all(np.isfinite(list(losses.values())))
