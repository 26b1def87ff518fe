"""experiments/bench_chimera_step.py runs (smoke shapes) and reports compile and step time with HLO counts."""
import json
import os

from experiments import bench_chimera_step


def test_smoke_reports_compile_step_and_hlo_counts(tmp_path):
    bench_chimera_step.main(["--smoke", "--archs=dense", "--inner=2", "--repeats=1", f"--out={tmp_path}"])
    rows = json.load(open(os.path.join(tmp_path, "bench_chimera_step.json")))["rows"]
    assert [r["arch"] for r in rows] == ["dense"]
    r = rows[0]
    assert r["step_compile_s"] > 0 and r["step_ms"] > 0 and r["instructions"] > 100 and r["fusion"] > 0
    assert "| dense |" in (tmp_path / "bench_chimera_step.md").read_text()
