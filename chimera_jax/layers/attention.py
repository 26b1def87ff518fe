"""Multi-head attention: MHA / GQA / MQA; RoPE (NTK-scaled), ALiBi or no positions; full causal or sliding window.

Caches: full attention appends to a [b s g k] buffer of ``max_len`` entries; a sliding window of width W keeps a
ring buffer of exactly W entries (slot = position mod W), so its memory does not grow with the context.
Both store each slot's absolute position, which is what the masks are built from: the parallel path, prefill and
decode all use the same rule  ``key visible  <=>  same document, k_pos <= q_pos, q_pos - k_pos < W``.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax._src import mesh as mesh_lib  # the legacy ``with mesh:`` context; jax has no public getter for it
from jax.sharding import Mesh, PartitionSpec as P

from chimera_jax.layers import common, positions as pos_lib

QKV_AXES = ("act_batch", "act_length", "act_heads", None)  # logical names of q, k, v [b t h k] / [b t g k]


def _context_mesh() -> Mesh | None:
    """The mesh the caller traces under (``jax.set_mesh`` or the older ``with mesh:``), or None."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        return mesh
    physical = mesh_lib.thread_resources.env.physical_mesh
    return None if physical.empty else physical


def per_shard(fn, q, k, v):
    """``fn(q, k, v)`` run on each device's shard of the batch (and of the heads under tensor parallelism).

    Attention is independent across examples and heads, so no communication is needed. Calling cuDNN's fused
    attention inside ``shard_map`` keeps it away from its custom partitioner, which rejects the shardings that
    propagation gives q, k and v under FSDP with grouped KV heads ("Query, key and value should have same
    sharding"). Without a mesh, or on one device, this is just ``fn(q, k, v)``.
    """
    mesh = _context_mesh()
    if mesh is None or mesh.size == 1:
        return fn(q, k, v)
    spec = nn.logical_to_mesh_axes(QKV_AXES)

    def live(axes, dim):  # the mesh axes of one dimension that exist, have size > 1 and split it evenly
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1)
        n = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        return axes if axes and all(x.shape[dim] % n == 0 for x in (q, k, v)) else None

    spec = P(live(spec[0], 0), None, live(spec[2], 2), None)
    return jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)


def default_config() -> ml_collections.ConfigDict:
    """Sub-block ``attention`` of the model config.

    num_heads: query heads (h).   num_kv_heads: key/value heads (g); g = h is MHA, 1 < g < h GQA, g = 1 MQA.
    head_dim: per-head width (k).   position: 'rope' | 'alibi' | 'none'.
    rope_theta: RoPE base.   rope_scaling_factor: NTK-aware context-extension factor (1 = off).
    window: 0 for full causal attention, W > 0 for a sliding window of W keys (the query's own included).
    impl: 'auto' | 'xla' | 'cudnn' (auto takes cuDNN flash attention on GPU where the mask allows it).
    """
    return ml_collections.ConfigDict(dict(num_heads=4, num_kv_heads=4, head_dim=32, position="rope",
                                          rope_theta=10_000.0, rope_scaling_factor=1.0, window=0, impl="auto"))


@flax.struct.dataclass
class KVCache:
    k: jax.Array      # [b s g k]   s = max_len (full) or W (sliding window ring buffer)
    v: jax.Array      # [b s g k]
    pos: jax.Array    # [b s] int32 absolute position held by each slot, -1 when empty
    index: jax.Array  # [b] int32 number of tokens consumed so far (= position of the next token)


def _visible(q_pos: jax.Array, k_pos: jax.Array, window: int) -> jax.Array:
    """[b t s] mask from query positions [b t] and key positions [b s] (-1 marks an empty key slot)."""
    delta = q_pos[:, :, None] - k_pos[:, None, :]
    ok = (k_pos[:, None, :] >= 0) & (delta >= 0)
    if window:
        ok &= delta < window
    return ok


def attend(q, k, v, mask, bias=None):
    """softmax(q k^T / sqrt(k) + bias, masked) v with grouped KV heads, logits in float32 or wider.

    q [b t h k], k/v [b s g k], mask [b t s] bool, bias [b h t s] or None -> [b t h k]. Written out (rather than
    jax.nn.dot_product_attention's XLA path, which rounds softmax to float32) so float64 tests are exact.
    """
    b, t, h, hd = q.shape
    g = k.shape[2]
    ftype = jnp.promote_types(q.dtype, jnp.float32)
    qg = q.reshape(b, t, g, h // g, hd)
    logits = jnp.einsum("btgrk,bsgk->bgrts", qg, k, preferred_element_type=ftype) * (hd ** -0.5)
    logits = logits.reshape(b, h, t, -1)
    if bias is not None:
        logits = logits + bias
    logits = jnp.where(mask[:, None], logits, jnp.finfo(ftype).min)
    probs = jax.nn.softmax(logits, axis=-1)
    # A query with no visible key (padding) gets zeros, not a uniform average.
    probs = jnp.where(mask[:, None].any(-1, keepdims=True), probs, 0.0)
    out = jnp.einsum("bgrts,bsgk->btgrk", probs.reshape(b, g, h // g, t, -1).astype(v.dtype), v,
                     preferred_element_type=ftype)
    return out.reshape(b, t, h, hd).astype(q.dtype)


class Attention(nn.Module):
    cfg: ml_collections.FrozenConfigDict
    window: int | None = None  # overrides cfg.attention.window (hybrid patterns mix full and local layers)

    @property
    def _window(self) -> int:
        return self.cfg.attention.window if self.window is None else self.window

    def init_cache(self, batch: int, max_len: int, dtype) -> KVCache:
        a = self.cfg.attention
        size = min(max_len, self._window) if self._window else max_len
        shape = (batch, size, a.num_kv_heads, a.head_dim)
        return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                       pos=jnp.full((batch, size), -1, jnp.int32), index=jnp.zeros((batch,), jnp.int32))

    @nn.compact
    def __call__(self, x, *, segment_ids=None, positions=None, cache: KVCache | None = None, decode=False):
        cfg, a = self.cfg, self.cfg.attention
        b, t, _ = x.shape
        h, g, hd = a.num_heads, a.num_kv_heads, a.head_dim
        if h % g:
            raise ValueError(f"model.attention.num_heads={h} must be a multiple of num_kv_heads={g}")
        dtype = common.dtype_of(cfg.dtype)
        q = common.dense(cfg, (h, hd), ("embed", "heads", "head_dim"), name="q_proj")(x)   # [b t h k]
        k = common.dense(cfg, (g, hd), ("embed", "kv_heads", "head_dim"), name="k_proj")(x)  # [b t g k]
        v = common.dense(cfg, (g, hd), ("embed", "kv_heads", "head_dim"), name="v_proj")(x)  # [b t g k]

        if cache is not None:
            # Positions continue from what the cache has consumed; one document per row.
            positions = cache.index[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
        elif positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if decode and t != 1:
            raise ValueError(f"decode=True consumes one token per call, got x of length {t}")
        if decode and cache is None:
            raise ValueError("decode=True needs a cache (Attention.init_cache)")

        if a.position == "rope":
            inv_freq = pos_lib.rope_frequencies(hd, a.rope_theta, a.rope_scaling_factor)
            q = pos_lib.apply_rope(q, positions, inv_freq)
            k = pos_lib.apply_rope(k, positions, inv_freq)
        elif a.position not in ("alibi", "none"):
            raise ValueError(f"model.attention.position must be 'rope', 'alibi' or 'none', got {a.position!r}")

        if cache is None:
            out = self._attend_parallel(q, k, v, positions, segment_ids)
            new_cache = None
        else:
            out, new_cache = self._attend_cached(q, k, v, positions, cache)
        # [b t h k] -> [b t h*k]: heads stay contiguous, so a 'heads'-sharded o_proj lines up with q_proj.
        y = common.dense(cfg, cfg.d_model, ("heads", "embed"), name="o_proj")(out.astype(dtype).reshape(b, t, h * hd))
        return y, new_cache

    def _bias(self, q_pos, k_pos, dtype):
        """ALiBi: a per-head linear penalty on distance, [b h t s] (float32 at least, float64 in tests)."""
        dtype = jnp.promote_types(dtype, jnp.float32)
        slopes = pos_lib.alibi_slopes(self.cfg.attention.num_heads, dtype)
        dist = (q_pos[:, :, None] - k_pos[:, None, :]).astype(dtype)
        return -slopes[None, :, None, None] * dist[:, None]

    def _attend_parallel(self, q, k, v, positions, segment_ids):
        a = self.cfg.attention
        b, t = q.shape[:2]
        use_cudnn = (a.impl == "cudnn" or (a.impl == "auto" and jax.default_backend() == "gpu"
                     and q.dtype in (jnp.bfloat16, jnp.float16)))
        if use_cudnn and a.position != "alibi" and segment_ids is None:
            # Flash attention: causal (and local) masking without materialising [t s] logits.
            window = (a_w - 1, 0) if (a_w := self._window) else None
            flash = functools.partial(jax.nn.dot_product_attention, is_causal=True, local_window_size=window,
                                      implementation="cudnn")
            return per_shard(flash, q, k, v)
        mask = _visible(positions, positions, self._window)
        # Index order, not positions, is what makes attention causal inside one packed row.
        mask &= jnp.tril(jnp.ones((t, t), bool))[None]
        if segment_ids is not None:
            mask &= segment_ids[:, :, None] == segment_ids[:, None, :]
        bias = self._bias(positions, positions, q.dtype) if a.position == "alibi" else None
        if q.dtype == jnp.float64:  # jax's XLA attention rounds softmax to float32; the written-out form does not
            return attend(q, k, v, mask, bias)
        return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask[:, None], implementation="xla")

    def _attend_cached(self, q, k, v, positions, cache: KVCache):
        """Attends over (cached keys ++ new keys), then writes the new keys into the cache."""
        a = self.cfg.attention
        t = q.shape[1]
        k_all = jnp.concatenate([cache.k.astype(k.dtype), k], axis=1)  # [b s+t g k]
        v_all = jnp.concatenate([cache.v.astype(v.dtype), v], axis=1)
        pos_all = jnp.concatenate([cache.pos, positions], axis=1)     # [b s+t]
        mask = _visible(positions, pos_all, self._window)
        bias = self._bias(positions, pos_all, q.dtype) if a.position == "alibi" else None
        out = attend(q, k_all, v_all, mask, bias)

        size = cache.k.shape[1]
        if self._window:
            # Ring buffer: only the last W new keys can survive; slot = position mod W.
            keep = min(t, size)
            k_new, v_new, p_new = k[:, -keep:], v[:, -keep:], positions[:, -keep:]
            slots = p_new % size  # [b keep], distinct within a row
        else:
            k_new, v_new, p_new = k, v, positions
            slots = positions
        rows = jnp.arange(q.shape[0])[:, None]
        new_cache = KVCache(k=cache.k.at[rows, slots].set(k_new.astype(cache.k.dtype), mode="drop"),
                            v=cache.v.at[rows, slots].set(v_new.astype(cache.v.dtype), mode="drop"),
                            pos=cache.pos.at[rows, slots].set(p_new, mode="drop"),
                            index=cache.index + t)
        return out, new_cache
