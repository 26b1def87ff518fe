"""The one training loop. It runs any stage (stages/base.py): sharding, jit, checkpoints, logging, eval, signals.

Read top to bottom: mesh -> stage -> state (restored or initialised, sharded) -> steps -> final checkpoint.

Between the steps that log, evaluate or checkpoint, the loop never waits on the device: steps are dispatched
asynchronously and their metrics dropped unread. The non-finite guard still sees every step, because the jitted
step carries on the device the longest run of skipped updates seen so far; the host reads it at the next step that
syncs, so a run is stopped at most ``log_every`` steps after the streak (see ``_LONGEST_STREAK``).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
from tqdm import tqdm

from chimera_jax import config_lib, stages
from chimera_jax.training import checkpointing, metrics as metrics_lib, sharding

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    pass


# Metrics the jitted step adds for the loop's own bookkeeping (read at syncs, not logged):
# the longest run of consecutive skipped updates up to this step (a running max: a streak that ended between two
# syncs is still seen), and the skipped updates so far (to warn about those since the last sync).
_LONGEST_STREAK, _SKIPPED_TOTAL = "nonfinite_longest_in_a_row", "nonfinite_total"


class _Signals:
    """SIGTERM / SIGINT set a flag; the loop checkpoints at the next step boundary and exits."""

    def __init__(self):
        self.received = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (notebooks): signals stay as they were
                pass
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _check_workdir_config(config, workdir: str) -> None:
    """Refuses to resume a workdir whose saved model differs from the config given now."""
    path = config_lib.resolved_config_path(workdir)
    if not os.path.exists(path):
        return
    saved = config_lib.load_resolved(workdir)
    for block in ("stage", "model"):
        if block in saved and json.loads(config_lib.to_json(saved)).get(block) != \
                json.loads(config_lib.to_json(config)).get(block):
            raise ValueError(f"workdir {workdir} holds a run whose config.{block} differs from the one given now; "
                             f"use a new --workdir, or the saved config ({path})")


def _truncate_metrics(workdir: str, step: int) -> None:
    """After resuming from ``step``, drop rows logged past it by the killed run (they will be logged again)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(rows)
    os.replace(tmp, path)


def train(config, workdir: str, *, stop_after: int | None = None):
    """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint), returns the final state.

    ``stop_after``: stop (with a checkpoint) once this many steps are done, as a preemption would; for tests.
    """
    workdir = os.path.abspath(os.path.expanduser(workdir))
    is_main = jax.process_index() == 0
    _check_workdir_config(config, workdir)
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.LOGICAL_RULES
    stage = stages.build(config)
    if is_main:
        os.makedirs(workdir, exist_ok=True)
        config_lib.save_resolved(config, workdir)
        stage.prepare_workdir(workdir)

    # Shardings of the whole state come from the logical names on the (abstract) parameters.
    rng = jax.random.PRNGKey(config.seed)
    init_rng, step_rng = jax.random.split(rng)
    state_shardings, abstract = sharding.state_shardings(stage.init, init_rng, mesh, rules)

    ckpt = checkpointing.Checkpointer(workdir, max_to_keep=config.checkpoint.max_to_keep,
                                      async_save=config.checkpoint.async_save)
    restored = ckpt.restore(abstract)
    if restored is None:
        with sharding.on_mesh(mesh, rules):
            state = jax.jit(lambda r: nn.meta.unbox(stage.init(r)), out_shardings=state_shardings)(init_rng)
        start = 0
    else:
        start, state, data_state = restored
        if data_state:
            stage.data.train.set_state(data_state)
        if is_main:
            _truncate_metrics(workdir, start)
        log.info("resumed from step %d", start)

    batch_sharding = sharding.batch_sharding(mesh, rules)

    def step_fn(state, batch, longest):
        state, metrics = stage.train_step(state, batch, jax.random.fold_in(step_rng, state.step))
        longest = jnp.maximum(longest, state.nonfinite_in_a_row)
        # The counters leave as metrics of their own: the state's buffers are donated to the next step, so the host
        # must never hold on to them (on GPU a donated buffer is gone).
        return state, dict(metrics, nonfinite_in_a_row=state.nonfinite_in_a_row, **{
            _LONGEST_STREAK: longest, _SKIPPED_TOTAL: state.nonfinite_total}), longest

    with sharding.on_mesh(mesh, rules):
        train_step = jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding, None),
                             out_shardings=(state_shardings, None, None), donate_argnums=0)
        eval_step = jax.jit(stage.eval_step, in_shardings=(state_shardings, batch_sharding))

    writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
    peak = metrics_lib.peak_flops()
    total = config.total_steps
    end = total if stop_after is None else min(total, stop_after)

    def evaluate(state, step):
        sums = None
        with sharding.on_mesh(mesh, rules):
            for batch in stage.data.eval_batches:
                out = eval_step(state, sharding.global_batch(batch, mesh, rules))
                sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
        result = stage.summarize_eval({k: float(v) for k, v in jax.device_get(sums).items()})
        writer.write(step, {f"eval/{k}": v for k, v in result.items()})
        stage.on_eval(state, step, workdir) if is_main else None
        return result

    def save(step, state, force=False):
        ckpt.save(step, state, stage.data.train.get_state(), force=force)

    # A log file (no terminal) gets a progress line every 30 s instead of every refresh.
    bar = tqdm(total=total, initial=start, disable=not is_main, dynamic_ncols=True, desc=config.stage,
               mininterval=0.5 if sys.stderr.isatty() else 30.0)
    # (step, metrics) of the last dispatched step that must be read (it logs, evaluates or checkpoints); read one
    # step late so that the device is busy with the next step meanwhile. Other steps' metrics are never read.
    pending = None
    t_last, step_last = time.perf_counter(), start
    eval_result = None
    skipped_seen = int(jax.device_get(state.nonfinite_total))  # at the last sync (read before any donation)
    # Device-side running max of nonfinite_in_a_row (resumes from 0). Placed on the mesh as the step's output is: a
    # mesh-less first value would be another input type and compile the train step a second time.
    longest = jax.device_put(jnp.zeros((), jnp.int32), sharding.replicated(mesh))

    def syncs(step):
        return (step % config.log_every == 0 or step % config.eval_every == 0 or step % config.checkpoint_every == 0
                or step == end or step == total)

    def flush(pending) -> int:
        """Reads the metrics of a synced step, logs them on log steps; returns the longest streak up to it."""
        nonlocal t_last, step_last, skipped_seen
        step, m = pending
        m = jax.device_get(m)
        streak, skipped = int(m.pop(_LONGEST_STREAK)), int(m.pop(_SKIPPED_TOTAL))
        new_skips = skipped - skipped_seen
        if new_skips > 0:
            log.warning("step %d: %d update(s) with a non-finite loss or gradient skipped since the last check",
                        step, new_skips)
        skipped_seen = skipped
        if step % config.log_every == 0 or step == end:
            now = time.perf_counter()
            rate = (step - step_last) * stage.tokens_per_step / max(now - t_last, 1e-9)
            row = {f"train/{k}": v for k, v in m.items()}
            row["perf/tokens_per_sec"] = rate
            if peak and stage.flops_per_step:
                row["perf/mfu"] = rate / stage.tokens_per_step * stage.flops_per_step / (peak * jax.device_count())
            writer.write(step, row)
            post = {"loss": f"{float(m['loss']):.4f}", "tok/s": f"{rate:,.0f}"}
            if "perf/mfu" in row:
                post["mfu"] = f"{100 * row['perf/mfu']:.1f}%"
            bar.set_postfix(post, refresh=False)
            t_last, step_last = now, step
        return streak

    def flush_and_check(pending, step, state):
        """Flushes ``pending``; stops the run (checkpoint at ``step``, the last dispatched) on a long streak."""
        if pending is None:
            return
        streak = flush(pending)
        if streak >= config.max_consecutive_nonfinite:
            save(step, state, force=True)
            ckpt.close()
            raise NonFiniteError(f"{streak} non-finite updates in a row by step {pending[0]} (limit "
                                 f"config.max_consecutive_nonfinite={config.max_consecutive_nonfinite}); checkpoint "
                                 f"saved at step {step}, see metrics.jsonl")

    with _Signals() as signals:
        step = start
        while step < end:
            batch = sharding.global_batch(next(stage.data.train), mesh, rules)
            with sharding.on_mesh(mesh, rules):
                state, m, longest = train_step(state, batch, longest)
            step += 1
            flush_and_check(pending, step, state)
            pending = (step, m) if syncs(step) else None
            bar.update(1)
            if step % config.eval_every == 0 or step == total:
                flush_and_check(pending, step, state)
                pending = None
                eval_result = evaluate(state, step)
                bar.write(f"step {step}: " + ", ".join(f"eval/{k}={v:.4f}" for k, v in eval_result.items()))
            if step % config.checkpoint_every == 0 or step == end:
                flush_and_check(pending, step, state)
                pending = None
                save(step, state, force=True)
            if signals.received:
                flush_and_check(pending, step, state)
                pending = None
                save(step, state, force=True)
                bar.write(f"{signals.received} received: checkpoint saved at step {step}; rerun the same "
                          "command to resume")
                break
        flush_and_check(pending, step, state)
    bar.close()
    ckpt.close()
    writer.close()
    return state, eval_result
