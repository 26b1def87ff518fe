"""model.loss_chunk: the loss from the output head a chunk of positions at a time equals the whole-sequence loss."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from chimera_jax import stages
from tests.lm_testing import micro_config


def _one_step(chunk, tie, ternary):
    c = micro_config(**{"model.tie_embeddings": tie, "model.ternary": ternary, "model.loss_chunk": chunk,
                        "model.dtype": "float64", "model.param_dtype": "float64"})
    stage = stages.build(c)
    state = nn.meta.unbox(stage.init(jax.random.PRNGKey(0)))
    batch = next(stage.data.train)
    batch["loss_mask"] = batch["loss_mask"] * (np.arange(batch["loss_mask"].shape[1]) % 5 != 0)  # some masked
    sums = jax.jit(stage.eval_step)(state, batch)
    new_state, metrics = jax.jit(stage.train_step)(state, batch, jax.random.PRNGKey(1))
    return sums, metrics, new_state.params


# The untied ternary head runs the untied float head's code plus the quantisation; the float untied case adds
# no path of its own and a training step each costs ~20 s on CI's CPU.
@pytest.mark.parametrize("tie,ternary", [(True, False), (False, True)])
def test_chunked_loss_and_update_equal_the_whole_sequence_ones(tie, ternary):
    with jax.enable_x64(True):
        full_sums, full_metrics, full_params = _one_step(0, tie, ternary)
        # 12 does not divide the sequence length 32: the padded positions must not count.
        sums, metrics, params = _one_step(12, tie, ternary)
    # The LM's logits are float32 whatever the model dtype, so sums taken in another order agree to float32
    # rounding, not further.
    for k in ("nll", "correct", "tokens"):
        np.testing.assert_allclose(sums[k], full_sums[k], rtol=2e-6)
    for k in ("loss", "accuracy", "grad_norm"):
        if k in full_metrics:
            np.testing.assert_allclose(metrics[k], full_metrics[k], rtol=2e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9), params, full_params)


def test_negative_loss_chunk_is_refused():
    with pytest.raises(ValueError, match="model.loss_chunk"):
        stages.build(micro_config(**{"model.loss_chunk": -1}))
