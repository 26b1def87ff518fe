"""The decode benchmark's --smoke path (tiny shapes on CPU) runs end to end and reports what it measured."""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "experiments"))
import bench_decode  # noqa: E402


def test_bench_decode_smoke(tmp_path):
    rows = bench_decode.main(["--smoke", f"--out={tmp_path}", "--models=dense,chimera,chimera-skip", "--batches=1"])
    assert {r["model"] for r in rows} == {"dense", "chimera", "chimera-skip"}
    report = json.load(open(tmp_path / "bench_decode.json"))
    assert report["meta"]["jax"] and report["meta"]["device"]
    md = (tmp_path / "bench_decode.md").read_text()
    assert "## batch 1" in md and "| chimera | 0.25/0.25/0.25/0.25 |" in md
    by = {r["model"]: r for r in report["rows"]}
    assert all(r["tokens_per_s"] > 0 and r["ms_per_step"] > 0 for r in report["rows"])
    # The dense cache holds every position; CHIMERA's full-attention buffer only its capacity (+ a W ring).
    assert by["chimera"]["kv_ratio_vs_dense"] > 1.0
    np.testing.assert_allclose(by["dense"]["kv_ratio_vs_dense"], 1.0)
    # The mix the timed steps ran is recorded (fractions of layer-steps), and the calibration moved the bias.
    np.testing.assert_allclose(sum(by["chimera"]["decoded_mix"]), 1.0)
    assert by["dense"]["decoded_mix"] is None
    assert any(b != 0 for b in by["chimera"]["bias"])
    assert by["chimera"]["seconds"]["compile_s"] > 0 and "calib_s" in by["chimera"]["seconds"]


def test_fill_cache_follows_the_modes():
    cfg = bench_decode.model_cfgs("tiny", True, ["chimera"])["chimera"]
    from chimera_jax.layers import chimera
    from chimera_jax.models.lm import LM

    cache = bench_decode.fill_cache(cfg, LM(cfg).init_cache(2, 64), 48)
    c = cache[0]
    assert (np.asarray(c.index) == 48).all()
    wp = np.asarray(c.window.pos)
    assert ((wp == -1) | ((wp >= 48 - cfg.chimera.window) & (wp < 48))).all()
    fp = np.asarray(c.full.pos[0])
    fp = fp[fp >= 0]
    assert len(fp) > 0 and (np.diff(fp) > 0).all()
    assert len(fp) <= chimera.full_capacity(cfg, 64)
    # The m2 counter says how many slots the buffer holds (decode writes the next m2 token after them).
    np.testing.assert_array_equal(np.asarray(c.count)[:, chimera.FULL], (np.asarray(c.full.pos) >= 0).sum(1))
