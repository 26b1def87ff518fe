"""model.scan_layers: the pattern's repeats as one scanned unit. Same function as the unrolled model (parameters
moved by unstack_layers), same decode, remat inside the scan, training on a sharded mesh then sampling, and clear
refusals."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from chimera_jax.models import lm as lm_model
from chimera_jax.training import loop
from chimera_jax.training.metrics import read_metrics
from tests.lm_testing import micro_config


def _pair(arch, repeats=3, **overrides):
    c = micro_config(arch, **overrides)
    c.model.num_layers = len(c.model.pattern.split()) * repeats
    unrolled = lm_model.LM(ml_collections.FrozenConfigDict(c.model))
    c.model.scan_layers = True
    return unrolled, lm_model.LM(ml_collections.FrozenConfigDict(c.model))


@pytest.mark.parametrize("arch", ["gdn", "griffin"])
def test_scanned_equals_unrolled_and_decodes(arch):
    unrolled, scanned = _pair(arch)
    toks = jax.random.randint(jax.random.key(0), (2, 16), 0, 100)
    params = jax.jit(scanned.init)(jax.random.key(1), toks)["params"]
    period = len(scanned.cfg.pattern.split())
    # the stacked axis carries its logical name on every parameter
    specs = jax.tree.leaves(nn.get_partition_spec(params)["layers"], is_leaf=lambda x: isinstance(x, PartitionSpec))
    assert specs and all(s[0] == "layers" for s in specs)
    params = nn.meta.unbox(params)
    assert all(a.shape[0] == 3 for a in jax.tree.leaves(params["layers"]))
    flat = lm_model.unstack_layers(params, scanned.cfg)
    assert sorted(k for k in flat if k.startswith("layer_")) == sorted(f"layer_{i}" for i in range(3 * period))
    back = lm_model.stack_layers(flat, scanned.cfg)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), back, params))

    want, _ = unrolled.apply({"params": flat}, toks)
    got, _ = scanned.apply({"params": params}, toks)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)

    # prefill then one token at a time, through the stacked caches
    cache = scanned.init_cache(2, 20)
    first, cache = scanned.apply({"params": params}, toks[:, :9], cache=cache)
    steps = [first]
    for t in range(9, 16):
        out, cache = scanned.apply({"params": params}, toks[:, t:t + 1], cache=cache, decode=True)
        steps.append(out)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), got, atol=2e-5, rtol=2e-5)


def test_remat_inside_the_scan_keeps_the_gradient():
    grads = {}
    for remat in ("none", "full", "dots"):
        _, scanned = _pair("gdn", **{"model.remat": remat})
        toks = jax.random.randint(jax.random.key(0), (2, 16), 0, 100)
        params = scanned.init(jax.random.key(1), toks)["params"]
        loss = lambda p: jnp.mean(scanned.apply({"params": p}, toks)[0] ** 2)
        grads[remat] = jax.jit(jax.grad(loss))(params)
    for remat in ("full", "dots"):
        for a, b in zip(jax.tree.leaves(grads[remat]), jax.tree.leaves(grads["none"])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("field, value, match", [("model.moe_every", 2, "moe_every"),
                                                 ("model.loop.core", 1, "loop")])
def test_what_cannot_be_stacked_is_refused_by_name(field, value, match):
    arch = "moe" if "moe" in field else "dense"
    c = micro_config(arch, **{field: value, "model.scan_layers": True})
    if "loop" in field:
        c.model.num_layers = 3
        c.model.loop.prelude, c.model.loop.max_loops = 1, 2
    model = lm_model.LM(ml_collections.FrozenConfigDict(c.model))
    with pytest.raises(ValueError, match=match):
        model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))


def test_scanned_gdn_trains_on_a_sharded_mesh(tmp_path):
    """Through the loop on a 2x2x2 mesh of CPU devices (the stacked axis is replicated, the rest sharded as
    unscanned), with a checkpoint and the switch in the saved config."""
    c = micro_config("gdn", total_steps=3, eval_every=3, checkpoint_every=3)
    c.data.seq_len = 16
    c.model.scan_layers = True
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
    loop.train(c, str(tmp_path))
    losses = [r["train/loss"] for r in read_metrics(tmp_path) if "train/loss" in r]
    assert len(losses) == 3 and np.all(np.isfinite(losses))
    assert '"scan_layers": true' in (tmp_path / "config.json").read_text()
    # and samples from its checkpoint through the stacked caches
    from chimera_jax import sampling

    out = sampling.Sampler(str(tmp_path)).generate("ab", 5, sampling.SamplingOptions(temperature=0.0),
                                                   stop_at_eos=False)
    assert len(out) == 5
