"""Checks of the sequence-mixer contract shared by the recurrent mixers' tests (float64 on CPU).

A ``Harness`` initialises a mixer once and keeps one jitted ``apply``, so that the checks of one test file share
their compiled programs (compilation, not arithmetic, is what costs time at these tiny shapes). Every check
runs inside ``jax.enable_x64(True)``.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.test_util import check_grads

B, T = 2, 16  # the batch and length most checks share, so that they share compiled programs


def inputs(d_model, b: int, t: int, seed: int = 0) -> jax.Array:
    """[b t d] float64 normal inputs; ``d_model`` is an int or a model block cfg."""
    d = getattr(d_model, "d_model", d_model)
    return jax.random.normal(jax.random.PRNGKey(seed), (b, t, d), jnp.float64)


def init_params(mod, x):
    # Jitted: an eager init would dispatch the forward pass op by op, which is slow on CPU.
    return jax.jit(mod.init)(jax.random.PRNGKey(1), x)


def packed_ids(lens_per_row) -> jax.Array:
    """[b t] segment ids from document lengths per row (ids 1, 2, ... in each row)."""
    rows = [np.repeat(np.arange(1, len(lens) + 1), lens) for lens in lens_per_row]
    assert len({len(r) for r in rows}) == 1, "rows must have equal total length"
    return jnp.asarray(np.stack(rows), jnp.int32)


def rel_err(a, b) -> float:
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def _jitter(params, key, scale=0.1):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([a + scale * jax.random.normal(k, a.shape, a.dtype) for a, k in zip(leaves, keys)])


class Harness:
    """``jitter``: perturb the initial params, so that zero-initialised gate weights, unit skips and zero biases
    do not leave paths untested. ``init_x``: the input to initialise on (default one token)."""

    def __init__(self, mod: nn.Module, d_model, *, jitter: bool = False, init_x=None):
        self.mod, self.d = mod, getattr(d_model, "d_model", d_model)
        with jax.enable_x64(True):
            self.init_params = init_params(mod, inputs(self.d, 1, 1) if init_x is None else init_x)
            self.params = (jax.jit(_jitter)(self.init_params, jax.random.PRNGKey(2)) if jitter
                           else self.init_params)
        self.apply = jax.jit(mod.apply, static_argnames=("decode",))

    def check_params_have_axis_names(self):
        leaves = jax.tree.leaves(self.init_params["params"], is_leaf=lambda a: isinstance(a, nn.LogicallyPartitioned))
        assert leaves and all(isinstance(a, nn.LogicallyPartitioned) for a in leaves)
        for a in leaves:
            assert len(a.names) == a.value.ndim, a

    def check_prefill_then_decode(self, *, seg=None, splits=(4, 8), b=B, t=T):
        """parallel(x) == prefill(x[:s0]) -> prefill(x[s0:s1]) (from a non-empty cache) -> one-token decodes.

        With ``seg`` (segment ids [b t]) the parallel run is packed and every call gets its slice of the ids, so
        documents start inside a prefill, at a call boundary and inside the decoded tail.
        """
        if seg is not None:
            b, t = seg.shape
        x = inputs(self.d, b, t)
        y_par, none = self.apply(self.params, x, segment_ids=seg)
        assert none is None
        cache = self.mod.init_cache(b, t, jnp.float64)
        ids = (lambda lo, hi: None) if seg is None else (lambda lo, hi: seg[:, lo:hi])
        ys = []
        for lo, hi in ((0, splits[0]), splits):
            y, cache = self.apply(self.params, x[:, lo:hi], segment_ids=ids(lo, hi), cache=cache)
            ys.append(y)
        structure = jax.tree.structure(cache)
        for i in range(splits[1], t):
            y, cache = self.apply(self.params, x[:, i:i + 1], segment_ids=ids(i, i + 1), cache=cache, decode=True)
            assert jax.tree.structure(cache) == structure
            ys.append(y)
        y_seq = jnp.concatenate(ys, axis=1)
        assert y_seq.shape == y_par.shape == x.shape
        assert float(jnp.max(jnp.abs(y_par))) > 1e-3  # an all-zero output would pass vacuously
        np.testing.assert_allclose(y_seq, y_par, rtol=1e-10, atol=1e-12 * float(jnp.max(jnp.abs(y_par))))

    def check_packed_equals_alone(self, lens_per_row):
        """A batch of packed documents gives the same outputs as each document run alone."""
        seg = packed_ids(lens_per_row)
        x = inputs(self.d, *seg.shape, seed=3)
        y_packed, _ = self.apply(self.params, x, segment_ids=seg)
        for row, lens in enumerate(lens_per_row):
            start = 0
            for n in lens:
                y_alone, _ = self.apply(self.params, x[row:row + 1, start:start + n])
                np.testing.assert_allclose(y_packed[row:row + 1, start:start + n], y_alone, rtol=1e-10,
                                           atol=1e-13)
                start += n

    def check_same_as(self, other_mod: nn.Module, *, seg):
        """Another configuration of the same module (e.g. the reference op) gives the same parallel output."""
        x = inputs(self.d, *seg.shape, seed=4)
        y, _ = self.apply(self.params, x, segment_ids=seg)
        y_other, _ = jax.jit(other_mod.apply)(self.params, x, segment_ids=seg)
        assert rel_err(y, y_other) <= 1e-10

    def check_gradients(self, *, seg=None, b=1, t=6):
        """Reverse-mode gradients w.r.t. params and inputs agree with central finite differences."""
        x = inputs(self.d, *((b, t) if seg is None else seg.shape), seed=5)
        f = jax.jit(lambda p, xx: self.mod.apply(p, xx, segment_ids=seg)[0])
        check_grads(f, (self.params, x), order=1, modes=("rev",), atol=1e-6, rtol=1e-6, eps=1e-5)


# The same checks as functions of (module, cfg), initialising on the full input each time (no shared compiles).

def check_params_have_axis_names(mod, x):
    Harness(mod, x.shape[-1], init_x=x).check_params_have_axis_names()


def check_prefill_then_decode(mod, cfg, *, b=2, t=17, splits=(5, 11), seg=None):
    x = inputs(cfg, b, t) if seg is None else inputs(cfg, *seg.shape)
    Harness(mod, cfg, init_x=x).check_prefill_then_decode(seg=seg, splits=splits, b=b, t=t)


def check_packed_equals_alone(mod, cfg, lens_per_row):
    seg = packed_ids(lens_per_row)
    Harness(mod, cfg, init_x=inputs(cfg, *seg.shape, seed=3)).check_packed_equals_alone(lens_per_row)


def check_gradients(mod, cfg, *, b=1, t=6, seg=None):
    x = inputs(cfg, *((b, t) if seg is None else seg.shape), seed=5)
    Harness(mod, cfg, init_x=x).check_gradients(seg=seg, b=b, t=t)
