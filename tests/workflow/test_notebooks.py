"""Every notebook in colab/ runs end to end (nbclient, a fresh kernel, one CPU device), so none of them rots."""
import glob
import json
import math
import os
import shutil

import pytest

from tests.lm_testing import REPO

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "colab", "*.ipynb")))
MODES = ("ssm", "window", "full", "identity")


def test_there_are_notebooks():
    names = {os.path.basename(p) for p in NOTEBOOKS}
    assert {"quickstart.ipynb", "layer_ablation.ipynb", "concept_pipeline.ipynb",
            "router_inspection.ipynb"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_is_saved_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"cell {i} of {path} has outputs"


def _summary(text: str, marker: str) -> dict:
    """The JSON object a notebook prints after ``marker`` (its last cell's summary line)."""
    lines = [line for line in text.splitlines() if line.startswith(marker)]
    assert len(lines) == 1, text[-2000:]
    return json.loads(lines[0][len(marker):])


def _png_size(path: str) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as img:
        assert img.format == "PNG", path
        return img.size


def _check_concept_pipeline(text: str, images: int) -> None:
    s = _summary(text, "concept pipeline done:")
    try:
        assert images >= 2  # the reconstruction grid and the generated samples were displayed
        # Recon grid: 8 validation digits (32 x 32, scaled x2) in a row, inputs above reconstructions.
        w, h = _png_size(s["recon_png"])
        assert w >= 8 * 64 and 2 * 64 <= h < 3 * 64, (w, h)
        # Samples: 3 rows (--num_samples), each the prompt digit then the planned one (16 + 16 concepts).
        w, h = _png_size(s["samples_png"])
        assert 2 * 64 <= w < 3 * 64 and 3 * 64 <= h < 4 * 64, (w, h)
        assert "prompt: 'mnist:7' -> 16 concepts" in text
        samples = [line for line in text.splitlines() if line.startswith("sample ")]
        assert len(samples) == 3
        for line in samples:
            concepts = json.loads(line.split(":", 1)[1])
            assert len(concepts) == 16 and all(0 <= k < 16 for k in concepts)
        # Stage 2 logged every CALL term, finite, at every logged step; the notebook printed them.
        rows = [json.loads(line) for line in open(os.path.join(s["stage2_dir"], "metrics.jsonl"))]
        train = [r for r in rows if "train/loss" in r]
        assert [r["step"] for r in train] == list(range(2, 17, 2))
        for key in ("ce", "mse", "contrastive", "adversarial", "disc_loss", "accuracy"):
            assert all(math.isfinite(r[f"train/{key}"]) for r in train), key
        assert "eval next-concept accuracy" in text
        assert 0.0 <= s["planner_accuracy"] <= 1.0 and 0 < s["image_bits_per_pixel"] < 8.5
    finally:
        for key in ("stage1_dir", "stage2_dir", "cache_dir"):
            shutil.rmtree(s[key], ignore_errors=True)


def _check_router_inspection(text: str, images: int) -> None:
    s = _summary(text, "router inspection done:")
    try:
        assert images >= 2  # the mode-mix plot and the router heat map were displayed
        for png in (s["mix_png"], s["heatmap"]):
            w, h = _png_size(png)
            assert w > h > 100, (png, w, h)
        rows = [json.loads(line) for line in open(os.path.join(s["workdir"], "metrics.jsonl"))]
        train = [r for r in rows if "train/loss" in r]
        assert len(train) == 20
        for layer in (0, 1):
            for r in train:  # the router's metrics were logged and each step's mix is a distribution
                mix = [r[f"train/layer_{layer}/mixer/mix_{m}"] for m in MODES]
                assert abs(sum(mix) - 1) < 1e-4 and 0 <= r[f"train/layer_{layer}/mixer/overflow"] <= 1
            assert abs(sum(s["train_mix"][f"layer_{layer}"].values()) - 1) < 0.01
            assert abs(sum(s["routed"]["mode_mix"][f"layer_{layer}"].values()) - 1) < 1e-6
        assert s["routed"]["tokens"] == 97  # BOS and the 96 bytes of the passage
        assert math.isfinite(s["bpb"]) and s["bpb"] < 8.5
    finally:
        shutil.rmtree(s["workdir"], ignore_errors=True)


CHECKS = {"concept_pipeline.ipynb": _check_concept_pipeline, "router_inspection.ipynb": _check_router_inspection}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_executes(path):
    nb = nbformat.read(path, as_version=4)
    first = next(c for c in nb.cells if c.cell_type == "code").source
    # The Colab install is there, and guarded so that it is skipped where chimera_jax is importable.
    assert "pip install" in first and 'find_spec("chimera_jax") is None' in first
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": os.path.join(REPO, "colab")}})
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", MPLBACKEND="Agg")
    client.execute(env=env)  # raises CellExecutionError naming the failing cell
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert " done" in text, text[-2000:]
    images = sum("image/png" in o.get("data", {}) for o in outputs)
    check = CHECKS.get(os.path.basename(path))
    if check:
        check(text, images)
