"""Every LM preset trains a few steps through the loop, and its layer pattern lands in the saved config."""
import json

import numpy as np
import pytest

from chimera_jax.training import loop
from chimera_jax.training.metrics import read_metrics
from configs import lm as lm_configs
from tests.lm_testing import micro_config


@pytest.mark.parametrize("arch", sorted(lm_configs.ARCHS))
def test_preset_trains(arch, tmp_path):
    c = micro_config(arch, total_steps=3, eval_every=3, checkpoint_every=3)
    c.data.seq_len = 16
    # One pass over the pattern (micro_config repeats a short one): every layer is compiled separately, so depth
    # is most of this test's time.
    c.model.num_layers = len(lm_configs.ARCHS[arch][0].split())
    loop.train(c, str(tmp_path))
    losses = [r["train/loss"] for r in read_metrics(tmp_path) if "train/loss" in r]
    assert len(losses) == 3 and np.all(np.isfinite(losses))
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model"]["pattern"] == lm_configs.ARCHS[arch][0]


def test_ternary_and_looping_switches_train(tmp_path):
    c = micro_config("dense", total_steps=3, eval_every=3, checkpoint_every=3)
    c.model.ternary = True
    c.model.num_layers = 3
    c.model.loop.prelude, c.model.loop.core, c.model.loop.max_loops = 1, 1, 3
    loop.train(c, str(tmp_path))
    losses = [r["train/loss"] for r in read_metrics(tmp_path) if "train/loss" in r]
    assert len(losses) == 3 and np.all(np.isfinite(losses))
