"""Both concept stages train through the shared loop and resume exactly; stage 2 refuses a mismatched stage 1."""
import json
import os

import jax
import numpy as np
import pytest

from chimera_jax.training import loop
from chimera_jax.training.metrics import read_metrics
from tests.concept.concept_testing import stage1_config, stage2_config


def _rows(workdir, key):
    return {r["step"]: r[key] for r in read_metrics(workdir) if key in r}


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """Every loop.train call jits afresh; a persistent cache lets the repeated runs reuse the executables."""
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    old = {k: getattr(jax.config, k) for k in keys}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield
    for k, v in old.items():
        jax.config.update(k, v)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """A straight 4-step stage-1 run (VQ with restarts) and a run stopped after 2 steps then resumed."""
    root = tmp_path_factory.mktemp("stage1")
    c = stage1_config()
    loop.train(c, str(root / "straight"))
    loop.train(c, str(root / "resumed"), stop_after=2)
    assert max(_rows(root / "resumed", "train/loss")) == 2
    loop.train(c, str(root / "resumed"))
    return root


def test_stage1_resumes_exactly(stage1):
    for key in ("train/loss", "train/level1/perplexity", "train/level0/dead_fraction", "eval/image_bits_per_pixel"):
        straight = _rows(stage1 / "straight", key)
        assert straight, key
        assert _rows(stage1 / "resumed", key) == straight, key
    assert sorted(_rows(stage1 / "straight", "train/loss")) == [1, 2, 3, 4]


def test_stage1_writes_recon_grids_and_usage(stage1):
    w = stage1 / "straight"
    assert sorted(os.listdir(w / "recon")) == ["step_000002.png", "step_000004.png"]
    from PIL import Image

    img = Image.open(w / "recon" / "step_000004.png")
    assert img.size[0] > 4 * 32 and img.size[1] > 2 * 32
    rows = [json.loads(line) for line in open(w / "codebook_usage.jsonl")]
    assert [r["step"] for r in rows] == [2, 4]
    assert 0 < rows[-1]["level1/usage"] <= 1 and rows[-1]["level1/vectors"] > 0


def test_stage2_refuses_a_mismatched_stage1(stage1, tmp_path):
    from chimera_jax.stages.planner import Stage1MismatchError

    c = stage2_config(str(stage1 / "straight"), str(tmp_path / "cache"), **{"model.num_codes": 32,
                                                                              "model.vocab_size": 33})
    with pytest.raises(Stage1MismatchError, match=r"model.num_codes=32 but its concept codebook has 16 codes"):
        loop.train(c, str(tmp_path / "w"))
    c = stage2_config(str(stage1 / "straight"), str(tmp_path / "cache"), **{"data.kind": "text"})
    with pytest.raises(Stage1MismatchError, match=r"data.kind='text' but it was trained on data.kind='mnist'"):
        loop.train(c, str(tmp_path / "w2"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        loop.train(stage2_config(str(tmp_path / "nothing"), str(tmp_path / "cache")), str(tmp_path / "w3"))


def test_stage2_trains_resumes_exactly_and_reuses_concepts(stage1, tmp_path):
    cache = tmp_path / "cache"
    c = stage2_config(str(stage1 / "straight"), str(cache))
    loop.train(c, str(tmp_path / "straight"))
    (enc_dir,) = os.listdir(cache)
    files = sorted(os.listdir(cache / enc_dir))
    assert files == ["codebook.npy", "eval.array_record", "meta.json", "train.array_record"]
    stamp = os.path.getmtime(cache / enc_dir / "train.array_record")
    loop.train(c, str(tmp_path / "resumed"), stop_after=2)
    loop.train(c, str(tmp_path / "resumed"))
    assert os.path.getmtime(cache / enc_dir / "train.array_record") == stamp  # encoded once, reused
    for key in ("train/loss", "train/ce", "train/mse", "train/contrastive", "train/adversarial", "train/disc_loss",
                "train/accuracy", "eval/accuracy"):
        straight = _rows(tmp_path / "straight", key)
        assert straight, key
        assert _rows(tmp_path / "resumed", key) == straight, key


def test_generate_plans_and_renders(stage1, tmp_path):
    from chimera_jax import generate_concepts as gen

    cache = tmp_path / "cache"
    c = stage2_config(str(stage1 / "straight"), str(cache), total_steps=2, eval_every=2, checkpoint_every=2)
    loop.train(c, str(tmp_path / "s2"))
    c1, model, variables, c2, planner, p2, codebook = gen.load(str(stage1 / "straight"), str(tmp_path / "s2"))
    prompt = gen.encode_prompt(c1, model, variables, "mnist:5")
    assert prompt.shape == (16,) and prompt.max() < 16
    context = np.concatenate([[16], prompt])
    concepts = gen.plan(planner, p2, codebook, context, 4, 2, 1.0, jax.random.PRNGKey(0))
    concepts = np.asarray(concepts)
    assert concepts.shape == (2, 20) and concepts.max() < 16      # the start symbol is never sampled
    np.testing.assert_array_equal(concepts[:, :16], np.broadcast_to(prompt, (2, 16)))
    out = gen.render(c1, model, variables, concepts, jax.random.PRNGKey(1), 1.0)
    assert len(out["image"]) == 2 and [im.shape for im in out["image"][0]] == [(32, 32), (32, 32)]
    # The second image holds 4 generated concepts (its first 4 patches) and blank patches after them.
    assert out["image"][0][1][8:].max() == 0
