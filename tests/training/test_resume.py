"""Exact resume: stopping (gracefully or by SIGKILL) and resuming reproduces the straight run bit for bit."""
import os
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import pytest

from chimera_jax import stages
from chimera_jax.training import checkpointing, loop
from chimera_jax.training.metrics import read_metrics
from tests.lm_testing import REPO, cli, micro_config


def _losses(workdir):
    return {r["step"]: r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r}


def _evals(workdir):
    return {r["step"]: r["eval/bpb"] for r in read_metrics(workdir) if "eval/bpb" in r}


def test_stop_and_resume_equals_straight_run(tmp_path):
    c = micro_config()
    loop.train(c, str(tmp_path / "straight"))
    loop.train(c, str(tmp_path / "resumed"), stop_after=4)
    assert max(_losses(tmp_path / "resumed")) == 4
    loop.train(c, str(tmp_path / "resumed"))
    straight, resumed = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
    assert sorted(straight) == list(range(1, 9))
    assert resumed == straight  # bit for bit, every step
    assert _evals(tmp_path / "resumed") == _evals(tmp_path / "straight")


def test_sigkill_mid_run_resumes_exactly(tmp_path):
    args = ["--config=configs/lm.py:arch=dense,size=tiny", "--config.total_steps=40", "--config.log_every=1",
            "--config.eval_every=20", "--config.checkpoint_every=3", "--config.optimizer.warmup_steps=2",
            "--config.model.num_layers=1", "--config.model.d_model=32", "--config.model.ffn_dim=64",
            "--config.model.attention.head_dim=8", "--config.data.seq_len=32", "--config.data.batch_size=4",
            "--config.data.eval_batches=1"]
    cli("chimera_jax.train", *args, f"--workdir={tmp_path}/straight")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, XLA_FLAGS="")
    proc = subprocess.Popen([sys.executable, "-m", "chimera_jax.train", *args, f"--workdir={tmp_path}/killed"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt_dir = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline:  # kill while it trains, after at least two checkpoints
        steps = [int(p) for p in os.listdir(ckpt_dir) if p.isdigit()] if ckpt_dir.exists() else []
        if len(steps) >= 2 and max(steps) < 36:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(_losses(tmp_path / "killed"))
    assert killed_at < 40, "the run finished before it could be killed"
    cli("chimera_jax.train", *args, f"--workdir={tmp_path}/killed")
    assert _losses(tmp_path / "killed") == _losses(tmp_path / "straight")


def test_sigterm_writes_a_checkpoint_then_exits(tmp_path):
    c = micro_config(total_steps=1000, checkpoint_every=1000, eval_every=1000)
    workdir = str(tmp_path / "w")

    calls = {"n": 0}
    real_next = None

    def send_sigterm_after_3(it):
        def wrapped():
            calls["n"] += 1
            if calls["n"] == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            return real_next()
        return wrapped

    orig_build = stages.build

    def build(config):
        nonlocal real_next
        stage = orig_build(config)
        real_next = stage.data.train.__next__
        stage.data.train = type("It", (), {"__next__": lambda self: send_sigterm_after_3(None)(),
                                           "get_state": stage.data.train.get_state,
                                           "set_state": stage.data.train.set_state})()
        return stage

    stages.build = build
    try:
        loop.train(c, workdir)
    finally:
        stages.build = orig_build
    assert checkpointing.Checkpointer(workdir).latest_step() == 3


def test_corrupted_checkpoint_falls_back_and_keeps_files(tmp_path):
    c = micro_config()
    workdir = tmp_path / "w"
    loop.train(c, str(workdir))  # checkpoints at 4 and 8
    step8 = workdir / "checkpoints" / "8"
    for root, _, files in os.walk(step8):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"garbage")
    before = sorted(os.listdir(workdir / "checkpoints"))
    # Restoring skips the unreadable step 8 for step 4, and deletes nothing.
    stage = stages.build(c)
    abstract = nn.meta.unbox(jax.eval_shape(stage.init, jax.random.PRNGKey(0)))
    step, _, _ = checkpointing.Checkpointer(str(workdir)).restore(abstract)
    assert step == 4
    assert sorted(os.listdir(workdir / "checkpoints")) == before


def test_no_readable_checkpoint_is_a_clear_error(tmp_path):
    c = micro_config(total_steps=4)
    workdir = tmp_path / "w"
    loop.train(c, str(workdir))
    for root, _, files in os.walk(workdir / "checkpoints" / "4"):
        for f in files:
            open(os.path.join(root, f), "wb").close()
    with pytest.raises(checkpointing.CheckpointError, match=r"checkpoints/4 is unreadable"):
        loop.train(c, str(workdir))
    assert (workdir / "checkpoints" / "4").exists()
