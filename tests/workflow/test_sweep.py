"""Sweeps: a 2-point sweep trains, a re-run skips finished points, the table and plots are written."""
import csv
import os
import textwrap

import numpy as np
import pytest

from experiments import sweep
from tests.lm_testing import REPO

FIXED = {"total_steps": 3, "log_every": 1, "eval_every": 3, "checkpoint_every": 3, "checkpoint.async_save": False,
         "optimizer.warmup_steps": 1, "model.num_layers": 1, "model.d_model": 16, "model.ffn_dim": 32,
         "model.attention.num_heads": 2, "model.attention.num_kv_heads": 1, "model.attention.head_dim": 8,
         "data.seq_len": 16, "data.batch_size": 8, "data.eval_batches": 1}


def _write_sweep(tmp_path, body: str) -> str:
    path = tmp_path / "s.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


def test_point_lists_product_zip_and_explicit(tmp_path):
    product = sweep.load_sweep(_write_sweep(tmp_path, """
        def get_sweep():
            return dict(name="p", base="configs/lm.py", axes={"model.d_model": [16, 32], "seed": [0, 1, 2]})
    """))
    assert len(product.points) == 6 and product.axes == ["model.d_model", "seed"]
    names = [p.name for p in sweep.point_list(product)]
    assert names[0] == "00_d_model=16_seed=0" and len(set(names)) == 6
    zipped = sweep.load_sweep(_write_sweep(tmp_path, """
        def get_sweep():
            return dict(name="z", base="configs/lm.py", mode="zip", axes={"model.d_model": [16, 32], "seed": [0, 1]})
    """))
    assert zipped.points == [{"model.d_model": 16, "seed": 0}, {"model.d_model": 32, "seed": 1}]
    explicit = sweep.load_sweep(_write_sweep(tmp_path, """
        def get_sweep():
            return dict(name="l", base="configs/lm.py:arch=griffin", points=[{"seed": 3}, {"model.num_layers": 8}])
    """))
    assert explicit.axes == ["seed", "model.num_layers"]
    c = sweep.point_config(explicit, sweep.point_list(explicit)[1])
    assert c.model.num_layers == 8 and c.model.arch == "griffin"
    bad = sweep.load_sweep(_write_sweep(tmp_path, """
        def get_sweep():
            return dict(name="b", base="configs/lm.py", points=[{"model.no_such_field": 1}])
    """))
    with pytest.raises(ValueError, match="no_such_field"):
        sweep.point_config(bad, sweep.point_list(bad)[0])
    with pytest.raises(ValueError, match="equal length"):
        sweep.load_sweep(_write_sweep(tmp_path, """
            def get_sweep():
                return dict(name="z", base="configs/lm.py", mode="zip", axes={"seed": [0, 1], "total_steps": [5]})
        """))


def test_two_point_sweep_runs_skips_and_reports(tmp_path, monkeypatch, capsys):
    path = _write_sweep(tmp_path, f"""
        def get_sweep():
            return dict(name="two", base="configs/lm.py:arch=dense,size=tiny", fixed={FIXED!r},
                        axes={{"optimizer.learning_rate": [1e-3, 1e-2]}})
    """)
    out, root = str(tmp_path / "results"), str(tmp_path / "runs")
    args = [path, f"--out={out}", f"--workdir_root={root}"]

    assert sweep.main(args + ["--print_commands"]) == 0
    commands = capsys.readouterr().out.strip().splitlines()
    assert len(commands) == 2 and all(c.startswith("python -m chimera_jax.train --config=") for c in commands)
    assert "--config.optimizer.learning_rate=0.01" in commands[1] and "--config.data.seq_len=16" in commands[1]

    # Point 0 in this process, point 1 as the printed train.py command would run it (a fresh process).
    assert sweep.main(args + ["--only=0"]) == 0
    assert sweep.main(args + ["--only=1", "--subprocess"]) == 0
    with open(os.path.join(out, "results.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["done", "done"]
    assert [float(r["optimizer.learning_rate"]) for r in rows] == [1e-3, 1e-2]
    assert all(int(r["step"]) == 3 and np.isfinite(float(r["eval/bpb"])) for r in rows)
    md = open(os.path.join(out, "results.md")).read()
    assert "| point | optimizer.learning_rate | status |" in md and "best eval/bpb" in md
    for png in ("loss_curves.png", "final_metric.png"):
        with open(os.path.join(out, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(out, "curves.csv")) as f:
        assert sum(1 for r in csv.DictReader(f) if r["metric"] == "train/loss") == 6  # 2 points x 3 steps

    def must_not_train(*a, **k):
        raise AssertionError("a finished point was trained again")

    monkeypatch.setattr(sweep, "run_point", must_not_train)
    capsys.readouterr()
    assert sweep.main(args) == 0
    assert capsys.readouterr().out.count("finished earlier, skipped") == 2
    assert sweep.main(args + ["--print_commands"]) == 0
    assert capsys.readouterr().out.strip() == ""  # nothing left to run


def test_example_sweep_file_has_four_points_over_two_axes():
    s = sweep.load_sweep(os.path.join(REPO, "experiments", "sweeps", "example_lm.py"))
    assert len(s.points) == 4 and s.axes == ["model.d_model", "optimizer.learning_rate"]
    assert sweep.point_config(s, sweep.point_list(s)[3]).model.d_model == 64
