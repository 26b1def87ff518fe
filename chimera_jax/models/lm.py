"""The language model: token embedding -> a stack of pre-norm residual blocks from a layer pattern -> logits.

Each block is ``x + mixer(norm(x))`` then ``x + ffn(norm(x))``; the mixer comes from the pattern code of its
layer (``layers/registry.py``), the feed-forward is SwiGLU, MoE (every ``moe_every``-th layer) or none.
Blocks are unrolled (``layer_i``), or with ``model.scan_layers`` one period of the pattern (``LayerUnit``) runs
under ``nn.scan`` over its repeats, its parameters stacked under ``layers``.
The same module runs the parallel path (training), prefill and one-token decode (sampling).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from chimera_jax.layers import common, registry
from chimera_jax.layers.ffn import SwiGLU

ACT_AXES = ("act_batch", "act_length", "act_embed")  # logical names of [b t d] activations at block boundaries


def uses_moe(cfg, layer: int) -> bool:
    every = cfg.get("moe_every", 0)
    return bool(every) and (layer + 1) % every == 0


class Block(nn.Module):
    cfg: ml_collections.FrozenConfigDict
    code: str
    moe: bool = False

    @nn.compact
    def __call__(self, x, segment_ids=None, positions=None, cache=None, decode=False):
        cfg = self.cfg
        h = common.rms_norm(cfg, name="mixer_norm")(x)
        y, cache = registry.build_mixer(self.code, cfg, "mixer")(
            h, segment_ids=segment_ids, positions=positions, cache=cache, decode=decode)
        x = x + y.astype(x.dtype)
        if cfg.ffn != "none":
            h = common.rms_norm(cfg, name="ffn_norm")(x)
            if self.moe:
                from chimera_jax.layers import moe  # imported only by models that use it

                y = moe.MoE(cfg, name="ffn")(h, segment_ids=segment_ids)
            else:
                y = SwiGLU(cfg, name="ffn")(h)
            x = x + y.astype(x.dtype)
        return nn.with_logical_constraint(x, ACT_AXES), cache


def remat_block(cfg):
    """Block under ``model.remat``: 'full' recomputes the block in the backward pass, 'dots' keeps the outputs of
    its matmuls (without batch dimensions) and recomputes the rest."""
    policy = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}[cfg.remat]
    return nn.remat(Block, policy=policy, static_argnums=(5,))


class LayerUnit(nn.Module):
    """One period of the layer pattern (a block per code, ``block_j``): the body of the scan over layers."""

    cfg: ml_collections.FrozenConfigDict
    codes: tuple[str, ...]
    remat: bool = False
    decode: bool = False

    @nn.compact
    def __call__(self, x, segment_ids, positions, caches):
        block_cls = remat_block(self.cfg) if self.remat else Block
        new = []
        for j, code in enumerate(self.codes):
            x, c = block_cls(self.cfg, code, False, name=f"block_{j}")(
                x, segment_ids, positions, None if caches is None else caches[j], self.decode)
            new.append(c)
        return x, (None if caches is None else tuple(new))


def check_scannable(cfg) -> None:
    """``model.scan_layers`` stacks the repeats of the pattern; refuse what a stack cannot express."""
    if not cfg.get("scan_layers", False):
        return
    loop = cfg.get("loop")
    if loop is not None and loop.core:
        raise ValueError("model.scan_layers=True does not combine with looping (model.loop.core > 0)")
    if cfg.get("moe_every", 0):
        raise ValueError("model.scan_layers=True does not combine with MoE layers (model.moe_every > 0): their "
                         "balancer reads per-layer loads")
    if "CH" in cfg.pattern.split():
        raise ValueError("model.scan_layers=True does not combine with CHIMERA router layers ('CH' in model.pattern)")


def _period(cfg) -> tuple[tuple[str, ...], int]:
    """(codes of one pattern period, number of repeats) of a scanned model."""
    codes = tuple(cfg.pattern.split())
    registry.parse_pattern(cfg.pattern, cfg.num_layers)  # validates the codes and the layer count
    return codes, cfg.num_layers // len(codes)


def unstack_layers(params, cfg) -> dict:
    """Parameters of a scanned model (``layers/block_j`` with a leading [repeats] axis) in the per-layer layout
    ``layer_i`` of an unscanned one (i = repeat * period + j); other entries unchanged."""
    codes, reps = _period(cfg)
    out = {k: v for k, v in params.items() if k != "layers"}
    for r in range(reps):
        for j in range(len(codes)):
            out[f"layer_{r * len(codes) + j}"] = jax.tree.map(lambda a: a[r], params["layers"][f"block_{j}"])
    return out


def stack_layers(params, cfg) -> dict:
    """The inverse of ``unstack_layers``: per-layer parameters into a scanned model's layout."""
    codes, reps = _period(cfg)
    out = {k: v for k, v in params.items() if not k.startswith("layer_")}
    out["layers"] = {f"block_{j}": jax.tree.map(lambda *a: jnp.stack(a),
                                                *[params[f"layer_{r * len(codes) + j}"] for r in range(reps)])
                     for j in range(len(codes))}
    return out


class LM(nn.Module):
    """Decoder-only LM. ``cfg`` is the model block of the config (see configs/lm.py for every field)."""

    cfg: ml_collections.FrozenConfigDict

    def layer_codes(self) -> list[str]:
        return registry.parse_pattern(self.cfg.pattern, self.cfg.num_layers)

    def _schedule(self, iterations: int) -> list[tuple[int, int]]:
        """(layer index, loop iteration) of every block application, in order; iteration -1 = not looped.

        Looping (Chimera-5.1): layers [0, prelude) run once, the next ``core`` layers run ``iterations`` times with
        shared weights, the remaining (coda) layers run once.
        """
        n = self.cfg.num_layers
        loop = self.cfg.get("loop")
        if loop is None or not loop.core:
            return [(i, -1) for i in range(n)]
        p, c = loop.prelude, loop.core
        if p + c > n:
            raise ValueError(f"model.loop.prelude + model.loop.core = {p + c} exceeds model.num_layers = {n}")
        return ([(i, -1) for i in range(p)] + [(i, it) for it in range(iterations) for i in range(p, p + c)]
                + [(i, -1) for i in range(p + c, n)])

    def init_cache(self, batch: int, max_len: int, dtype=None) -> tuple[Any, ...]:
        """One cache per block application (a looped core layer has one per inference loop), in order; a scanned
        model (``model.scan_layers``) has one per code of the pattern, stacked over the repeats."""
        dtype = dtype or common.dtype_of(self.cfg.dtype)
        if self.cfg.get("scan_layers", False):
            codes, reps = _period(self.cfg)
            one = [registry.build_mixer(c, self.cfg, None, parent=None).init_cache(batch, max_len, dtype)
                   for c in codes]
            return tuple(jax.tree.map(lambda a: jnp.broadcast_to(a[None], (reps,) + a.shape), c) for c in one)
        codes = self.layer_codes()
        iterations = self.cfg.loop.inference_loops if self.cfg.get("loop") else 1
        return tuple(registry.build_mixer(codes[i], self.cfg, None, parent=None).init_cache(batch, max_len, dtype)
                     for i, _ in self._schedule(iterations))

    @nn.compact
    def __call__(self, tokens, *, segment_ids=None, positions=None, cache=None, decode=False, loop_counts=None,
                 return_hidden=False):
        """tokens [b t] int32 -> (logits [b t v] float32, cache or None).

        return_hidden: return the final-normed hidden states [b t d] in place of the logits, for a loss that
        applies the output head itself a chunk at a time (``head_logits``; the stage's ``model.loss_chunk``).

        loop_counts [b] int32: per-sequence number of core loops (training samples them, see
        ``sample_loop_counts``); None runs ``model.loop.inference_loops`` for every sequence.
        """
        cfg = self.cfg
        dtype = common.dtype_of(cfg.dtype)
        embedding = common.param(self, "embedding", nn.initializers.normal(cfg.init_std),
                                 (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), common.dtype_of(cfg.param_dtype))
        x = jnp.take(embedding, tokens, axis=0).astype(dtype)  # [b t d]
        x = nn.with_logical_constraint(x, ACT_AXES)

        if cfg.get("scan_layers", False):
            # One LayerUnit (a period of the pattern) scanned over the repeats: the compiler sees one unit's
            # program, not num_layers copies. Every collection gets the leading [repeats] axis, named "layers".
            check_scannable(cfg)
            codes, reps = _period(cfg)
            units = nn.scan(LayerUnit, variable_axes={True: 0}, split_rngs={"params": True},
                            in_axes=(nn.broadcast, nn.broadcast, 0), length=reps,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            remat = cfg.remat != "none" and not decode and cache is None
            x, new_cache = units(cfg, codes, remat, decode, name="layers")(x, segment_ids, positions, cache)
            return self._head(x, embedding, dtype, return_hidden, cache, new_cache)

        block_cls = remat_block(cfg) if cfg.remat != "none" and not decode and cache is None else Block
        codes = self.layer_codes()
        blocks = [block_cls(cfg, code, uses_moe(cfg, i), name=f"layer_{i}") for i, code in enumerate(codes)]
        loop = cfg.get("loop")
        looped = loop is not None and loop.core > 0
        if looped and loop_counts is not None and cache is None:
            iterations = loop.max_loops
        else:
            iterations = loop.inference_loops if looped else 1
            loop_counts = None
        new_cache = []
        injected = None
        for slot, (i, it) in enumerate(self._schedule(iterations)):
            layer_cache = None if cache is None else cache[slot]
            inp = x
            if it >= 0 and i == loop.prelude:
                # Input injection: every loop after the first starts from its state plus the prelude's output,
                # so the prelude keeps a gradient path through the loops that keep theirs.
                if it == 0:
                    injected = x
                else:
                    inp = x + injected
            y, layer_cache = blocks[i](inp, segment_ids, positions, layer_cache, decode)
            if loop_counts is not None and it >= 0:
                # Sequences whose count is used up keep their state; only the last k loops get a gradient.
                active = (it < loop_counts)[:, None, None]
                y = jnp.where(active, y, x)
                if i == loop.prelude + loop.core - 1:
                    y = jnp.where((it < loop_counts - loop.backprop_last_k)[:, None, None],
                                  jax.lax.stop_gradient(y), y)
            x = y
            new_cache.append(layer_cache)

        return self._head(x, embedding, dtype, return_hidden, cache, new_cache)

    def _head(self, x, embedding, dtype, return_hidden, cache, new_cache):
        """Final norm, then logits [b t v] float32 (or the normed hidden states with ``return_hidden``)."""
        cfg = self.cfg
        x = common.rms_norm(cfg, name="final_norm")(x)
        if return_hidden and not self.is_initializing():
            return x, (None if cache is None else tuple(new_cache))
        if cfg.tie_embeddings:
            logits = jnp.einsum("btd,vd->btv", x, embedding.astype(dtype), preferred_element_type=jnp.float32)
        else:
            logits = common.dense(cfg, cfg.vocab_size, ("embed", "vocab"), name="lm_head")(x)
        logits = nn.with_logical_constraint(logits.astype(jnp.float32), ("act_batch", "act_length", "act_vocab"))
        return logits, (None if cache is None else tuple(new_cache))


def loop_config() -> ml_collections.ConfigDict:
    """Sub-block ``model.loop`` (Chimera-5.1 looped depth); core=0 turns looping off.

    prelude / core / coda: layer counts (coda = num_layers - prelude - core). min_loops / max_loops: range of the
    per-sequence loop count sampled in training. inference_loops: the fixed count at evaluation and sampling.
    backprop_last_k: gradients flow through the last k loops of each sequence only (truncated backprop).
    """
    return ml_collections.ConfigDict(dict(prelude=0, core=0, min_loops=1, max_loops=4, inference_loops=2,
                                          backprop_last_k=2))


def sample_loop_counts(cfg, rng, batch: int):
    """[b] int32 loop counts, uniform in [min_loops, max_loops], or None when the model does not loop."""
    loop = cfg.get("loop")
    if loop is None or not loop.core:
        return None
    return jax.random.randint(rng, (batch,), loop.min_loops, loop.max_loops + 1, dtype=jnp.int32)


def head_logits(cfg, params, x: jax.Array) -> jax.Array:
    """The output head of ``LM`` applied outside it: x [.. d] (final-normed) -> logits [.. v] float32.

    ``params`` are the LM's (unboxed) parameters. Computes exactly what ``LM.__call__`` does after its final norm
    (tied: the embedding table with float32 accumulation; untied: ``lm_head`` in ``cfg.dtype``, ternary when the
    model is), so that a loss can take the logits of one chunk of positions at a time.
    """
    dtype = common.dtype_of(cfg.dtype)
    if cfg.tie_embeddings:
        table = nn.meta.unbox(params["embedding"])  # [v d]
        return jnp.einsum("...d,vd->...v", x, table.astype(dtype), preferred_element_type=jnp.float32)
    w = nn.meta.unbox(params["lm_head"]["kernel"])  # [d v]
    if cfg.get("ternary", False):
        from chimera_jax.layers import bitlinear

        x, w = bitlinear.quantize_for_training(x, w)
    return jnp.tensordot(x.astype(dtype), w.astype(dtype), axes=((x.ndim - 1,), (0,))).astype(jnp.float32)
