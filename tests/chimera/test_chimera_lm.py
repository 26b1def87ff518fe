"""A 'chimera' language model trains through the one loop: mode mix in the metrics, balancing bias in model_state."""
import jax
import numpy as np

from chimera_jax.layers import registry
from chimera_jax.training import loop
from chimera_jax.training.metrics import read_metrics
from tests.lm_testing import micro_config


def test_chimera_lm_trains_through_the_loop(tmp_path):
    c = micro_config("chimera")
    assert c.model.pattern == "CH" and registry.MIXERS["CH"].block == "chimera"
    c.model.mamba2.d_state = 8
    c.model.mamba2.head_dim = 32
    c.model.chimera.window = 8          # < seq_len 32: the window mode is a real sliding window
    c.model.chimera.router_hidden = 16
    c.model.chimera.bias_update_rate = 0.05
    c.total_steps = 6
    c.eval_every = 6
    c.checkpoint_every = 6
    state, eval_result = loop.train(c, str(tmp_path))
    rows = read_metrics(str(tmp_path))
    train = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train] == list(range(1, 7))
    assert all(np.isfinite(r["train/loss"]) for r in train)
    for layer in range(c.model.num_layers):
        keys = [f"train/layer_{layer}/mixer/mix_{m}" for m in ("ssm", "window", "full", "identity")]
        for r in train:
            assert all(k in r for k in keys), sorted(r)
            assert abs(sum(r[k] for k in keys) - 1.0) < 1e-5
    assert np.isfinite(eval_result["loss"])
    # The balancing bias rides in the train state (not the params) and moved from zero.
    bias = jax.device_get(state.model_state["chimera_stats"]["layer_0"]["mixer"]["bias"])
    assert bias.shape == (4,) and np.abs(bias).max() > 0
    assert "chimera_stats" not in state.params
