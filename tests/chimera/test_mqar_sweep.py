"""The MQAR sweep runner: launch order, parallel slots, the time budget, timeouts, the table, a real tiny sweep."""
import json
import os
import time

import pytest

from experiments import mqar_sweep as ms


def test_plan_covers_the_grid_key_archs_and_first_lr_first():
    jobs = ms.plan(ms.FULL, ms.ARCHS)
    keys = {(j["arch"], j["d_model"], j["seq_len"], j["num_kv_pairs"], j["lr"]) for j in jobs}
    n_cells = len(ms.FULL["d_models"]) * len(ms.FULL["settings"])
    assert len(jobs) == len(keys) == n_cells * len(ms.ARCHS) * len(ms.FULL["lrs"])
    n_key = n_cells * len(ms.KEY_ARCHS)
    first = jobs[:n_key]  # every cell of dense and chimera at the preferred lr before anything else
    assert {j["arch"] for j in first} == set(ms.KEY_ARCHS) and {j["lr"] for j in first} == {ms.FULL["lrs"][0]}
    assert {(j["d_model"], j["seq_len"]) for j in first} == {(d, L) for d in ms.FULL["d_models"]
                                                             for L, _ in ms.FULL["settings"]}
    assert all(j["arch"] in ms.KEY_ARCHS for j in jobs[:n_key * len(ms.FULL["lrs"])])
    assert all(j["arch"] not in ms.KEY_ARCHS for j in jobs[n_key * len(ms.FULL["lrs"]):])
    assert first[0]["d_model"] * first[0]["seq_len"] == max(d * L for d in ms.FULL["d_models"]
                                                            for L, _ in ms.FULL["settings"])


class _FakeRun:
    """Finishes 0.1 s after its start with an accuracy that grows with lr; records how many ran at once."""
    live = 0
    peak = 0
    envs = []

    def __init__(self, job, grid, root, env):
        self.job, self.t0 = job, time.time()
        _FakeRun.live += 1
        _FakeRun.peak = max(_FakeRun.peak, _FakeRun.live)
        _FakeRun.envs.append(env)

    def poll(self, timeout):
        if time.time() - self.t0 < 0.1:
            return None
        _FakeRun.live -= 1
        return dict(name=ms.run_name(self.job, ms.TINY), **self.job, accuracy=min(1.0, 100 * self.job["lr"]))


def test_sweep_keeps_parallel_slots_and_stops_at_the_budget(tmp_path):
    grid = dict(ms.TINY, lrs=(1e-3, 2e-3, 3e-3, 4e-3, 5e-3))
    jobs = ms.plan(grid, ("dense",))
    _FakeRun.live = _FakeRun.peak = 0
    rows, not_run = ms.sweep(jobs, grid, str(tmp_path), parallel=3, run_cls=_FakeRun)
    assert len(rows) == 5 and not not_run and _FakeRun.peak == 3
    env = _FakeRun.envs[-1]  # shared accelerator: on-demand memory, a third of it at most each
    assert env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false" and float(env["XLA_PYTHON_CLIENT_MEM_FRACTION"]) < 0.34
    # A budget spent while the first two run: nothing else starts, and the rest is reported as not run.
    rows, not_run = ms.sweep(jobs, grid, str(tmp_path), parallel=2, budget_s=0.05, run_cls=_FakeRun)
    assert [r["lr"] for r in rows] == [1e-3, 2e-3] and [j["lr"] for j in not_run] == [3e-3, 4e-3, 5e-3]
    text = ms.report(rows, grid, "tiny", str(tmp_path), not_run=not_run, archs=("dense",), wall_s=1.0)
    assert "| dense | 20.0% (lr 0.002; 2/5 lr) |" in text
    assert "Not run (time budget spent, or absent from the merged files; 3 runs)" in text
    assert ms.run_name(not_run[0], grid) in text
    saved = json.load(open(tmp_path / "mqar_sweep.json"))
    assert len(saved["runs"]) == 2 and len(saved["not_run"]) == 3
    assert (tmp_path / "mqar_sweep.md").exists() and (tmp_path / "mqar_sweep.png").exists()


def test_real_runs_in_parallel_then_skip_when_done_and_timeout_kills(tmp_path):
    out, work = str(tmp_path / "out"), str(tmp_path / "work")
    ms.main(["--grid=tiny", "--archs=dense", "--settings=16x2", "--parallel=2", f"--out={out}", f"--workdirs={work}"])
    saved = json.load(open(os.path.join(out, "mqar_sweep.json")))
    assert len(saved["runs"]) == 2 and all("error" not in r for r in saved["runs"]), saved["runs"]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["step"] == ms.TINY["steps"] for r in saved["runs"])
    assert all(r["curve"][-1][0] == ms.TINY["steps"] for r in saved["runs"])
    # Finished runs are read back, not trained again.
    t0 = time.time()
    rows, _ = ms.sweep(ms.plan(ms.TINY, ("dense",)), ms.TINY, work, parallel=2)
    first = {r["name"]: r["accuracy"] for r in saved["runs"]}  # (in the order the runs finished)
    assert time.time() - t0 < 5 and {r["name"]: r["accuracy"] for r in rows} == first
    # An earlier call's runs join the table (--merge): nothing is trained again; other steps are refused.
    merged_out, merged_work = tmp_path / "merged", tmp_path / "unused"
    merge = os.path.join(out, "mqar_sweep.json")
    ms.main(["--grid=tiny", "--archs=dense", f"--merge={merge}", f"--out={merged_out}", f"--workdirs={merged_work}"])
    assert len(json.load(open(merged_out / "mqar_sweep.json"))["runs"]) == 2 and not merged_work.exists()
    with pytest.raises(SystemExit, match="steps"):
        ms.main(["--grid=tiny", "--steps=3", f"--merge={merge}", f"--out={merged_out}", f"--workdirs={merged_work}"])
    # A run past its timeout is killed and reported as failed.
    job = dict(arch="dense", d_model=16, seq_len=16, num_kv_pairs=2, lr=1e-2)
    rows, _ = ms.sweep([job], ms.TINY, work, timeout=1)
    assert rows[0]["error"].startswith("timeout") and rows[0]["seconds"] < 10


def test_inproc_engine_shards_and_report_only_merge(tmp_path):
    """The in-process engine trains the same config/stage as train.py; two shards split the runs; the
    report-only merge joins their tables without training anything."""
    outs = []
    for i in range(2):
        out = str(tmp_path / f"shard{i}")
        ms.main(["--grid=tiny", "--archs=dense", "--settings=16x2", "--engine=inproc", f"--shard={i}/2",
                 f"--out={out}"])
        runs = json.load(open(os.path.join(out, "mqar_sweep.json")))["runs"]
        assert len(runs) == 1 and "error" not in runs[0], runs
        assert runs[0]["step"] == ms.TINY["steps"] and 0.0 <= runs[0]["accuracy"] <= 1.0
        assert list(runs[0]["curve"][-1]) == [ms.TINY["steps"], round(runs[0]["accuracy"], 4)]
        outs.append(os.path.join(out, "mqar_sweep.json"))
    assert {json.load(open(p))["runs"][0]["lr"] for p in outs} == set(ms.TINY["lrs"])
    merged = tmp_path / "merged"
    ms.main(["--grid=tiny", "--archs=dense", "--settings=16x2", "--report_only", f"--merge={','.join(outs)}",
             f"--out={merged}"])
    saved = json.load(open(merged / "mqar_sweep.json"))
    assert len(saved["runs"]) == 2 and saved["not_run"] == []
    assert "2/2 lr" not in (merged / "mqar_sweep.md").read_text()  # both learning rates counted
    # A run over its time limit reports what it reached and says so.
    row = ms.train_inproc(dict(arch="dense", d_model=16, seq_len=16, num_kv_pairs=2, lr=1e-3), ms.TINY, timeout=0)
    assert row["error"].startswith("timeout") and "step 0" in row["error"]


def test_named_variant_reaches_the_config_and_merge_prefers_finished_runs(tmp_path):
    """--variant=NAME=ARCH:key=value builds ARCH's config with the extra keys, under its own row name; in a
    report-only merge a finished run of a cell beats a failed one whatever the file order."""
    from configs import mqar as mqar_config

    name, arch, extra = ms.parse_variant("chimera_slow=chimera:router_rate=0.0005:window=8")
    assert (name, arch, extra) == ("chimera_slow", "chimera", "router_rate=0.0005,window=8")
    with pytest.raises(ValueError, match="ARCH one of"):
        ms.parse_variant("x=nope:router_rate=1")
    ms.VARIANTS[name] = (arch, extra)
    try:
        job = dict(arch=name, d_model=16, seq_len=16, num_kv_pairs=2, lr=1e-3)
        cfg = mqar_config.get_config(ms.config_variant(job, ms.TINY))
        assert cfg.model.chimera.bias_update_rate == 0.0005 and cfg.model.chimera.window == 8
        assert ms.run_name(job, ms.TINY).startswith("chimera_slow_d16")
    finally:
        ms.VARIANTS.pop(name)
    default = mqar_config.get_config("arch=chimera")
    assert default.model.chimera.bias_update_rate == 0.001  # router_rate=0 keeps the layer's default

    grid = dict(ms.TINY)
    row = dict(arch="dense", d_model=16, seq_len=16, num_kv_pairs=2, lr=1e-3, name="r", step=2, accuracy=0.5,
               curve=[[2, 0.5]])
    config = {k: grid[k] for k in ("steps", "batch_size", "vocab_size")}
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(dict(grid=grid, config=config, runs=[row], not_run=[], wall_s=1)))
    failed = dict(row, accuracy=0.1, error="timeout after 1 s at step 1")
    bad.write_text(json.dumps(dict(grid=grid, config=config, runs=[failed], not_run=[], wall_s=1)))
    for order in ((good, bad), (bad, good)):
        out = tmp_path / f"m{order[0].stem}"
        ms.main(["--grid=tiny", "--archs=dense", "--settings=16x2", "--lrs=1e-3", "--report_only",
                 f"--merge={order[0]},{order[1]}", f"--out={out}"])
        runs = json.load(open(out / "mqar_sweep.json"))["runs"]
        assert [r.get("error") for r in runs] == [None] and runs[0]["accuracy"] == 0.5
