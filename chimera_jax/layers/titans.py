"""Titans neural memory, Memory-as-Context variant (Behrouz, Zhong & Mirrokni, 2024), as a sequence mixer.

A long-term memory M — per head a two-layer MLP ``M(z) = silu(z W1) W2`` whose weights are the memory — is read
and written at test time. Each token x_t goes through, in this order:

1. **retrieve**: ``h_t = M_seg(q_t)`` with ``q_t = normalize(x_t W_Q^mem)``, where ``M_seg`` is the memory as it was
   at the start of the token's memory chunk (``chunk_size`` tokens, counted from the document start);
   ``h_t`` becomes a *memory token* ``m_t = h_t W_mem`` of width d_model.
2. **attend**: causal attention of x_t over the context ``[persistent slots] ++ [m_s, x_s for the last window
   positions s <= t of the document]`` — persistent slots are learned tokens, the retrieved memory tokens sit
   beside the input tokens, keys and values of all three come from the same W_K, W_V. ``y_t = W_O attn``.
3. **update**: the memory is written with the attention output: ``k_t = normalize(y_t W_K^mem)``,
   ``v_t = y_t W_V^mem``, associative loss ``l(M; y_t) = ||M(k_t) - v_t||^2``; surprise with momentum and
   forgetting,
       ``S_t = eta_t S_{t-1} - theta_t grad l(M_seg; y_t)``,   ``M_t = (1 - alpha_t) M_{t-1} + S_t``,
   with the gradient taken at the chunk-start memory ``M_seg`` (the chunk-wise form of the paper, which makes a
   chunk's gradients independent of each other). ``theta = lr_max sigmoid(.)``, ``alpha, eta = sigmoid(.)`` are
   per head and token, from x_t.
The layer output is y_t. Because retrieval reads the chunk-start memory, a token never reads a memory written by
itself or by later tokens; the update of chunk n is first read by chunk n + 1. (The paper's final gate
``y_t * M_t(y_t)`` is left out: at chunk granularity it would read the memory written by later tokens.)

Packed documents: at a document start the memory returns to its learned initial weights, the momentum to zero
and the attention window empties. The cache (``TitansCache``) holds the memory weights, the chunk-start memory,
the momentum, the window of keys/values (two entries per position), the position in the document and the id of
the last segment, so prefill and decode continue a document exactly.

Implementation: ``impl='reference'`` runs the three steps token by token in a ``lax.scan`` (the oracle, used for
decode as well). There is no chunked (parallel-in-time) form yet, so ``auto`` runs the same scan.
"""
from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections

from chimera_jax.layers import common

IMPLS = ("auto", "reference")


def default_config() -> ml_collections.ConfigDict:
    """Sub-block ``titans`` of the model config.

    num_heads: heads (h) of the attention and of the memory.   head_dim: width per head (k).
    mem_hidden_mult: hidden width of each head's memory MLP / head_dim.
    num_persistent: learned persistent memory slots prepended to every context (0 = none).
    window: positions each token attends to, itself included (each brings an input and a memory token).
    chunk_size: tokens per memory chunk; gradients inside a chunk are taken at the chunk-start memory and
      retrieval reads it.
    lr_max: largest test-time learning rate theta.
    impl: 'auto' | 'reference'.
    """
    return ml_collections.ConfigDict(dict(num_heads=4, head_dim=32, mem_hidden_mult=2, num_persistent=4,
                                          window=64, chunk_size=64, lr_max=0.1, impl="auto"))


@flax.struct.dataclass
class TitansCache:
    mem1: jax.Array          # [b h k m] memory weights W1 after the last token
    mem2: jax.Array          # [b h m k] memory weights W2
    seg1: jax.Array          # [b h k m] W1 at the start of the current memory chunk (read by retrieval)
    seg2: jax.Array          # [b h m k]
    mom1: jax.Array          # [b h k m] momentum S of the surprise
    mom2: jax.Array          # [b h m k]
    win_k: jax.Array         # [b n h k] keys of the last window - 1 positions, n = 2 (window - 1)
    win_v: jax.Array         # [b n h k] values
    win_valid: jax.Array     # [b n] bool
    pos: jax.Array           # [b] int32 position in the document of the next token
    last_segment: jax.Array  # [b] int32 segment id of the last token consumed (-1 = none yet)


def _dims(cfg):
    c = cfg.titans
    for field in ("num_heads", "head_dim", "mem_hidden_mult", "window", "chunk_size"):
        if c[field] < 1:
            raise ValueError(f"model.titans.{field}={c[field]} must be >= 1")
    if c.num_persistent < 0:
        raise ValueError(f"model.titans.num_persistent={c.num_persistent} must be >= 0")
    return c.num_heads, c.head_dim, c.mem_hidden_mult * c.head_dim


# ------------------------------------------------------------------------------------------- memory MLP

def memory_apply(w1: jax.Array, w2: jax.Array, z: jax.Array) -> jax.Array:
    """M(z) = silu(z W1) W2 per head: w1 [b h k m], w2 [b h m k], z [b h k] -> [b h k]."""
    return jnp.einsum("bhm,bhmk->bhk", jax.nn.silu(jnp.einsum("bhk,bhkm->bhm", z, w1)), w2)


def memory_loss(w1, w2, k, v) -> jax.Array:
    """The associative loss ||M(k) - v||^2, summed over batch and heads (each (b, h) has its own weights)."""
    return jnp.sum((memory_apply(w1, w2, k) - v) ** 2)


def memory_grad(w1, w2, k, v) -> tuple[jax.Array, jax.Array]:
    """grad of ||M(k) - v||^2 w.r.t. (W1, W2), written out as outer products (k [b h k], v [b h k]).

    The outer-product form is what a chunked implementation sums over tokens with matmuls; the tests hold it
    equal to autodiff of ``memory_loss``.
    """
    a = jnp.einsum("bhk,bhkm->bhm", k, w1)
    s = jax.nn.silu(a)
    err = 2.0 * (jnp.einsum("bhm,bhmk->bhk", s, w2) - v)              # d loss / d M(k)
    g2 = s[..., :, None] * err[..., None, :]                           # [b h m k]
    sig = jax.nn.sigmoid(a)
    da = jnp.einsum("bhk,bhmk->bhm", err, w2) * sig * (1 + a * (1 - sig))  # silu'(a) = sig (1 + a (1 - sig))
    g1 = k[..., :, None] * da[..., None, :]                            # [b h k m]
    return g1, g2


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return xf * jax.lax.rsqrt(jnp.sum(xf * xf, axis=-1, keepdims=True) + eps)


# ------------------------------------------------------------------------------------------------ module

class _Kernel(nn.Module):
    """Declares a projection weight ``kernel`` [in, *out] (the layout ``common.DenseGeneral`` uses) and returns it.

    The memory-dependent projections run inside a ``lax.scan`` over tokens, where Linen submodules cannot be
    called; the weight is fetched here and applied by ``_project``, which does what DenseGeneral does.
    """

    shape: tuple
    axes: tuple
    param_dtype: common.Dtype = jnp.float32

    @nn.compact
    def __call__(self):
        init = nn.initializers.normal(stddev=self.shape[0] ** -0.5)
        return common.param(self, "kernel", init, self.shape, self.axes, self.param_dtype)


def _project(cfg, x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., in] @ w [in, *out] in cfg.dtype, ternary (BitLinear) when cfg.ternary — as common.DenseGeneral."""
    if cfg.get("ternary", False):
        from chimera_jax.layers import bitlinear

        x, w = bitlinear.quantize_for_training(x, w)
    dtype = common.dtype_of(cfg.dtype)
    return jnp.tensordot(x.astype(dtype), w.astype(dtype), axes=((x.ndim - 1,), (0,)))


class TitansMAC(nn.Module):
    cfg: ml_collections.FrozenConfigDict

    def init_cache(self, batch: int, max_len: int, dtype) -> TitansCache:
        """An empty cache. The memory weights are filled from the parameters at the first call (the learned
        initial memory), because init_cache has no parameters: ``pos == 0`` marks that nothing was consumed."""
        del max_len  # the memory and the window do not grow with the context
        h, k, m = _dims(self.cfg)
        n = 2 * (self.cfg.titans.window - 1)
        sd = jnp.promote_types(dtype, jnp.float32)
        z1, z2 = jnp.zeros((batch, h, k, m), sd), jnp.zeros((batch, h, m, k), sd)
        return TitansCache(mem1=z1, mem2=z2, seg1=z1, seg2=z2, mom1=z1, mom2=z2,
                           win_k=jnp.zeros((batch, n, h, k), dtype), win_v=jnp.zeros((batch, n, h, k), dtype),
                           win_valid=jnp.zeros((batch, n), bool), pos=jnp.zeros((batch,), jnp.int32),
                           last_segment=jnp.full((batch,), -1, jnp.int32))

    @nn.compact
    def __call__(self, x, *, segment_ids=None, positions=None, cache: TitansCache | None = None, decode=False):
        del positions  # document starts come from segment_ids; chunk boundaries from the cache's count
        cfg, c = self.cfg, self.cfg.titans
        b, t, d = x.shape
        h, k, m = _dims(cfg)
        if c.impl not in IMPLS:
            raise ValueError(f"model.titans.impl must be one of {IMPLS}, got {c.impl!r}")
        if decode and t != 1:
            raise ValueError(f"decode=True consumes one token per call, got x of length {t}")
        if decode and cache is None:
            raise ValueError("decode=True needs a cache (TitansMAC.init_cache)")
        if segment_ids is not None and segment_ids.shape != (b, t):
            raise ValueError(f"segment_ids must be [b t] = {(b, t)}; got {segment_ids.shape}")
        dtype, pdtype = common.dtype_of(cfg.dtype), common.dtype_of(cfg.param_dtype)
        sd = jnp.promote_types(dtype, jnp.float32)

        # Projections that do not depend on the memory run in parallel over all tokens.
        q = common.dense(cfg, (h, k), ("embed", "heads", "head_dim"), name="q_proj")(x)        # [b t h k]
        q_mem = l2_normalize(common.dense(cfg, (h, k), ("embed", "heads", "head_dim"), name="mq_proj")(x))
        gates = common.dense(cfg, (3, h), ("embed", None, "heads"), name="gate_proj")(x).astype(sd)  # [b t 3 h]
        theta = c.lr_max * jax.nn.sigmoid(gates[:, :, 0])      # [b t h] test-time learning rate
        alpha = jax.nn.sigmoid(gates[:, :, 1])                  # [b t h] forgetting
        eta = jax.nn.sigmoid(gates[:, :, 2])                    # [b t h] momentum decay

        # Weights used inside the token loop (fetched here, applied by _project).
        w_k = _Kernel((d, h, k), ("embed", "heads", "head_dim"), pdtype, name="k_proj")()
        w_v = _Kernel((d, h, k), ("embed", "heads", "head_dim"), pdtype, name="v_proj")()
        w_mem = _Kernel((h * k, d), ("heads", "embed"), pdtype, name="mem_token_proj")()
        w_o = _Kernel((h * k, d), ("heads", "embed"), pdtype, name="o_proj")()
        w_wk = _Kernel((d, h, k), ("embed", "heads", "head_dim"), pdtype, name="write_k_proj")()
        w_wv = _Kernel((d, h, k), ("embed", "heads", "head_dim"), pdtype, name="write_v_proj")()
        init1 = common.param(self, "memory_w1", nn.initializers.normal(k ** -0.5), (h, k, m),
                             ("heads", "head_dim", "mlp"), pdtype)
        init2 = common.param(self, "memory_w2", nn.initializers.normal(m ** -0.5), (h, m, k),
                             ("heads", "mlp", "head_dim"), pdtype)
        kx, vx = _project(cfg, x, w_k), _project(cfg, x, w_v)  # [b t h k] input tokens' keys / values
        if c.num_persistent:
            persistent = common.param(self, "persistent", nn.initializers.normal(1.0), (c.num_persistent, d),
                                      (None, "embed"), pdtype)
            kp, vp = _project(cfg, persistent, w_k), _project(cfg, persistent, w_v)  # [p h k]
        else:
            kp = vp = jnp.zeros((0, h, k), dtype)

        if cache is None:
            cache = self.init_cache(b, t, dtype)
            return_cache = False
        else:
            return_cache = True
        # A row starts a new document at token 0 unless it continues the cached one (same id, something consumed).
        starts = common.segment_starts(segment_ids, t, b)  # [b t], True at 0
        continues = cache.pos > 0
        if segment_ids is not None:
            continues &= segment_ids[:, 0] == cache.last_segment
        starts = starts.at[:, 0].set(~continues)

        init_mem = (jnp.broadcast_to(init1.astype(sd), (b, h, k, m)), jnp.broadcast_to(init2.astype(sd), (b, h, m, k)))
        params = dict(w_k=w_k, w_v=w_v, w_mem=w_mem, w_o=w_o, w_wk=w_wk, w_wv=w_wv, kp=kp, vp=vp,
                      init_mem=init_mem)
        xs = dict(q=q, q_mem=q_mem, kx=kx, vx=vx, theta=theta, alpha=alpha, eta=eta, start=starts)
        xs = jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), xs)  # time-major for the scan
        step = lambda carry, xt: _token_step(cfg, params, carry, xt)
        new_cache, (y, attn) = jax.lax.scan(step, cache, xs)
        y = jnp.moveaxis(y, 0, 1)  # [b t d]
        # Sown for the tests (retrieve -> attend -> update): the attention outputs the memory was written with.
        self.sow("intermediates", "attn_out", jnp.moveaxis(attn, 0, 1))
        if segment_ids is not None:
            new_cache = new_cache.replace(last_segment=segment_ids[:, -1].astype(jnp.int32))
        return y.astype(dtype), (new_cache if return_cache else None)


def _token_step(cfg, p, cache: TitansCache, xt):
    """One token through retrieve -> attend -> update (all rows of the batch at once)."""
    c = cfg.titans
    dtype = common.dtype_of(cfg.dtype)
    b, n = cache.win_valid.shape
    h, k = cache.win_k.shape[2:]
    start = xt["start"]  # [b]
    sd = cache.mem1.dtype

    def pick(a, reset_value):  # per-row reset of a cached array at a document start
        return jnp.where(start.reshape((b,) + (1,) * (a.ndim - 1)), reset_value, a)

    i1, i2 = p["init_mem"]
    mem1, mem2 = pick(cache.mem1, i1), pick(cache.mem2, i2)
    mom1, mom2 = pick(cache.mom1, 0.0), pick(cache.mom2, 0.0)
    pos = jnp.where(start, 0, cache.pos)
    valid = cache.win_valid & ~start[:, None]
    # A new memory chunk begins every chunk_size tokens of the document: its start memory is the current one.
    new_chunk = (pos % c.chunk_size) == 0
    seg1 = jnp.where(new_chunk[:, None, None, None], mem1, cache.seg1)
    seg2 = jnp.where(new_chunk[:, None, None, None], mem2, cache.seg2)

    # 1. retrieve from the chunk-start memory
    h_t = memory_apply(seg1, seg2, xt["q_mem"].astype(sd))                       # [b h k]
    mem_tok = _project(cfg, h_t.reshape(b, h * k).astype(dtype), p["w_mem"])     # [b d]
    km, vm = _project(cfg, mem_tok, p["w_k"]), _project(cfg, mem_tok, p["w_v"])  # [b h k]

    # 2. attend: persistent slots ++ window (previous positions) ++ this position's memory and input tokens
    n_p = p["kp"].shape[0]
    keys = jnp.concatenate([jnp.broadcast_to(p["kp"], (b, n_p, h, k)).astype(dtype), cache.win_k,
                            km[:, None], xt["kx"][:, None]], axis=1)              # [b s h k]
    vals = jnp.concatenate([jnp.broadcast_to(p["vp"], (b, n_p, h, k)).astype(dtype), cache.win_v,
                            vm[:, None], xt["vx"][:, None]], axis=1)
    ok = jnp.concatenate([jnp.ones((b, n_p), bool), valid, jnp.ones((b, 2), bool)], axis=1)  # [b s]
    logits = jnp.einsum("bhk,bshk->bhs", xt["q"].astype(sd), keys.astype(sd)) * k ** -0.5
    logits = jnp.where(ok[:, None], logits, -jnp.inf)
    attn = jnp.einsum("bhs,bshk->bhk", jax.nn.softmax(logits, axis=-1), vals.astype(sd))  # [b h k]
    y = _project(cfg, attn.reshape(b, h * k).astype(dtype), p["w_o"])            # [b d]

    # 3. update the memory with the attention output (gradient at the chunk-start memory)
    kw = l2_normalize(_project(cfg, y, p["w_wk"])).astype(sd)                    # [b h k]
    vw = _project(cfg, y, p["w_wv"]).astype(sd)
    g1, g2 = jax.grad(memory_loss, argnums=(0, 1))(seg1, seg2, kw, vw)
    th, al, et = (xt[name][..., None, None] for name in ("theta", "alpha", "eta"))  # [b h 1 1]
    mom1, mom2 = et * mom1 - th * g1, et * mom2 - th * g2
    mem1, mem2 = (1 - al) * mem1 + mom1, (1 - al) * mem2 + mom2

    # the window slides by one position: drop the oldest pair of entries, append this position's pair
    win_k = jnp.concatenate([cache.win_k, km[:, None], xt["kx"][:, None]], axis=1)[:, 2:]
    win_v = jnp.concatenate([cache.win_v, vm[:, None], xt["vx"][:, None]], axis=1)[:, 2:]
    win_valid = jnp.concatenate([valid, jnp.ones((b, 2), bool)], axis=1)[:, 2:]
    new = TitansCache(mem1=mem1, mem2=mem2, seg1=seg1, seg2=seg2, mom1=mom1, mom2=mom2,
                      win_k=win_k.astype(cache.win_k.dtype), win_v=win_v.astype(cache.win_v.dtype),
                      win_valid=win_valid, pos=pos + 1, last_segment=cache.last_segment)
    return new, (y, attn)
