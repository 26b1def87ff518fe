"""experiments/bench_train.py at a tiny shape on CPU: the sharded init, the jitted step under the mesh, the
report; with the Gated DeltaNet op's Pallas path (interpreted here) as the end-to-end GPU run uses it."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bench_train_smoke(tmp_path):
    cmd = [sys.executable, os.path.join(REPO, "experiments", "bench_train.py"), "--arch=gdn", "--sizes=tiny",
           "--seq_len=32", "--batch=8", "--steps=1", "--set=model.gdn.impl=pallas;model.loss_chunk=16",
           f"--out={tmp_path}", "--name=smoke"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.load(open(tmp_path / "smoke.json"))
    (row,) = report["rows"]
    assert "error" not in row, row
    assert row["tokens_per_sec"] > 0 and row["step_ms"] > 0 and row["model.gdn.impl"] == "pallas"
    assert "| gdn | tiny |" in (tmp_path / "smoke.md").read_text()
