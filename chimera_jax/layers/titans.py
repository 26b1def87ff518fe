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

Implementations (``impl``):
- ``reference``: the three steps token by token in a ``lax.scan`` (the oracle; decode always uses this step).
- ``chunked``: a ``lax.scan`` over blocks of ``chunk_size`` positions of the call, parallel inside a block.
  Inside one memory chunk every token reads, and takes its gradient at, the same chunk-start memory, so
  retrieval, the windowed attention, the write keys / values and the gradients of a block are computed for all
  its tokens at once (the gradients as outer-product factors, never one [k m] matrix per token). The momentum
  and forgetting recurrences are linear, so the memory and momentum after a run of tokens are the start state
  times products of (1 - alpha) and eta, minus weighted sums of the gradients; the weights come from a
  [l l] matrix of log-decay sums per head (``_decay_sums``). Only the state at a block end is formed.
  Blocks are positions of the call, memory chunks are counted per document, so they need not line up. In a
  block of at most ``chunk_size`` positions, the document continued from the previous block has at most one
  chunk boundary, and documents that start inside the block read the learned initial memory throughout it.
  Tokens therefore read one of three memories: the carried chunk-start memory (the continued document before
  its boundary), the memory at that boundary (after it), or the initial memory. A block runs in two passes:
  the first computes the tokens before the boundary (they read known memories) and from their gradients the
  memory at the boundary; the second computes every token with the memory it reads. The first pass is left
  out at trace time when every chunk is known to start at a block start (no segment ids, no cache), so packed
  or continued inputs cost about twice the work of unpacked ones. The attention window that reaches into
  earlier blocks is carried in the scan as in the cache (two entries per position); a length that is not a
  multiple of ``chunk_size`` pads the last block. With ``remat`` the backward pass recomputes each block.
- ``auto``: ``chunked`` (decode of one token uses the token step).
"""
from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections

from chimera_jax.layers import common

IMPLS = ("auto", "chunked", "reference")


def default_config() -> ml_collections.ConfigDict:
    """Sub-block ``titans`` of the model config.

    num_heads: heads (h) of the attention and of the memory.   head_dim: width per head (k).
    mem_hidden_mult: hidden width of each head's memory MLP / head_dim.
    num_persistent: learned persistent memory slots prepended to every context (0 = none).
    window: positions each token attends to, itself included (each brings an input and a memory token).
    chunk_size: tokens per memory chunk; gradients inside a chunk are taken at the chunk-start memory and
      retrieval reads it.
    lr_max: largest test-time learning rate theta.
    impl: 'auto' (= 'chunked') | 'chunked' (scan over blocks of chunk_size) | 'reference' (scan over tokens).
    remat: chunked form only: recompute each block in the backward pass instead of keeping its intermediates
      (training memory about the carried state per block: at d_model 2048, 32 heads of 64, window 512,
      chunk 64, batch 8 x 4096 tokens, about 8 GiB of temporaries instead of about 44).
    """
    return ml_collections.ConfigDict(dict(num_heads=4, head_dim=32, mem_hidden_mult=2, num_persistent=4,
                                          window=64, chunk_size=64, lr_max=0.1, impl="auto", remat=True))


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
        if c.impl == "reference" or decode:
            xs = jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), xs)  # time-major for the scan
            step = lambda carry, xt: _token_step(cfg, params, carry, xt)
            new_cache, (y, attn) = jax.lax.scan(step, cache, xs)
            y, attn = jnp.moveaxis(y, 0, 1), jnp.moveaxis(attn, 0, 1)  # [b t d], [b t h k]
        else:
            # log (1 - alpha) and log eta from the gate logits (finite gradients where a sigmoid saturates)
            xs.update(log_keep=jax.nn.log_sigmoid(-gates[:, :, 1]), log_eta=jax.nn.log_sigmoid(gates[:, :, 2]))
            # Without segment ids and without a cache every memory chunk starts at a block start.
            aligned = segment_ids is None and not return_cache
            new_cache, y, attn = _chunked_scan(cfg, params, cache, xs, aligned=aligned)
        # Sown for the tests (retrieve -> attend -> update): the attention outputs the memory was written with.
        self.sow("intermediates", "attn_out", attn)
        if segment_ids is not None:
            new_cache = new_cache.replace(last_segment=segment_ids[:, -1].astype(jnp.int32))
        return y.astype(dtype), (new_cache if return_cache else None)


def _token_step(cfg, p, cache: TitansCache, xt):
    """One token through retrieve -> attend -> update (all rows of the batch at once)."""
    c = cfg.titans
    dtype = common.dtype_of(cfg.dtype)
    b = cache.win_valid.shape[0]
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


# --------------------------------------------------------------------------------------- chunked form

def _apply_tokens(w1, w2, z):
    """M(z) under several memories at once: w1 [r b h k m], w2 [r b h m k], z [b l h k] -> [r b l h k]."""
    return jnp.einsum("rblhm,rbhmk->rblhk", jax.nn.silu(jnp.einsum("blhk,rbhkm->rblhm", z, w1)), w2)


def memory_grad_factors(w1, w2, k, v):
    """Per-token gradients of ||M(k_t) - v_t||^2 under several memories (w1 [r b h k m], w2 [r b h m k]), as the
    factors of ``memory_grad``'s outer products: grad W1 = k_t (x) da_t, grad W2 = s_t (x) err_t.
    k, v [b l h k] -> (s [r b l h m], err [r b l h k], da [r b l h m]); sums over tokens are then matmuls."""
    a = jnp.einsum("blhk,rbhkm->rblhm", k, w1)
    s = jax.nn.silu(a)
    err = 2.0 * (jnp.einsum("rblhm,rbhmk->rblhk", s, w2) - v)
    sig = jax.nn.sigmoid(a)
    da = jnp.einsum("rblhk,rbhmk->rblhm", err, w2) * sig * (1 + a * (1 - sig))
    return s, err, da


def _select(values, which):
    """values [r b l ...] -> [b l ...]: each token's entry for the memory it reads (which [b l] in [0, r))."""
    return jax.tree.map(lambda a: jnp.take_along_axis(a, which.reshape((1,) + which.shape + (1,) * (a.ndim - 3)),
                                                      axis=0)[0], values)


def _decay_sums(log_x):
    """log_x [b l h] -> [b h l l] with [t, s] = sum of log_x over (s, t] for t >= s and -inf above the diagonal.

    Built as a cumulative sum of a masked matrix rather than as differences of one cumulative sum, so a long
    run of small decays keeps its relative precision."""
    lx = jnp.moveaxis(log_x, 1, -1)  # [b h l]
    n = lx.shape[-1]
    rows = jnp.broadcast_to(lx[..., :, None], lx.shape + (n,))  # [.., u, s] = log_x_u
    sums = jnp.cumsum(jnp.where(jnp.tri(n, n, -1, dtype=bool), rows, 0.0), axis=-2)
    return jnp.where(jnp.tri(n, n, 0, dtype=bool), sums, -jnp.inf)


def _run_update(mem, mom, lo, hi, log_keep, log_eta, theta, kw, factors):
    """Memory and momentum after the tokens lo <= s < hi of a block (per row), from (mem, mom) before lo:

        S_end = E S_0 - sum_s cS_s theta_s g_s,   M_end = A M_0 + B S_0 - sum_s cM_s theta_s g_s,
        cS_s = prod_{s<u<hi} eta_u,   cM_s = sum_{s<=t<hi} prod_{t<u<hi} (1 - alpha_u) prod_{s<u<=t} eta_u,
        E = prod eta,   A = prod (1 - alpha),   B = eta_lo cM_lo   (products over the run).

    An empty run (hi <= lo) returns the start state. mem, mom: pairs ([b h k m], [b h m k]); lo, hi [b];
    log_keep, log_eta, theta [b l h]; kw [b l h k] and factors (s, err, da) of each token's gradient."""
    n = theta.shape[1]
    idx = jnp.arange(n)
    x_keep, x_eta = _decay_sums(log_keep), _decay_sums(log_eta)  # [b h l l]
    last = jnp.clip(hi - 1, 0, n - 1)[:, None, None, None]
    keep_to_end = jnp.take_along_axis(x_keep, last, axis=2)[:, :, 0]  # [b h l]: log prod_{t<u<hi} (1 - alpha_u)
    eta_to_end = jnp.take_along_axis(x_eta, last, axis=2)[:, :, 0]
    in_run = ((idx >= lo[:, None]) & (idx < hi[:, None]))[:, None]  # [b 1 l]
    p = jnp.where(in_run, jnp.exp(keep_to_end), 0.0)
    c_s = jnp.where(in_run, jnp.exp(eta_to_end), 0.0)
    c_m = jnp.where(in_run, jnp.einsum("bht,bhts->bhs", p, jnp.exp(x_eta)), 0.0)
    first = jnp.clip(lo, 0, n - 1)[:, None, None]
    at_lo = lambda a: jnp.take_along_axis(a, first, axis=2)[..., 0]  # [b h l] -> [b h]
    eta_lo = jnp.exp(at_lo(jnp.moveaxis(log_eta, 1, -1)))
    keep_lo = jnp.exp(at_lo(jnp.moveaxis(log_keep, 1, -1)))
    empty = (hi <= lo)[:, None]
    e = jnp.where(empty, 1.0, eta_lo * at_lo(c_s))[..., None, None]  # [b h 1 1]
    a = jnp.where(empty, 1.0, keep_lo * at_lo(p))[..., None, None]
    bb = jnp.where(empty, 0.0, eta_lo * at_lo(c_m))[..., None, None]
    s, err, da = factors
    wt = jnp.stack([c_m, c_s]) * jnp.moveaxis(theta, 1, -1)  # [2 b h l]: weights for M and for S
    g1 = jnp.einsum("cbhl,blhk,blhm->cbhkm", wt, kw, da)
    g2 = jnp.einsum("cbhl,blhm,blhk->cbhmk", wt, s, err)
    new_mem = (a * mem[0] + bb * mom[0] - g1[0], a * mem[1] + bb * mom[1] - g2[0])
    new_mom = (e * mom[0] - g1[1], e * mom[1] - g2[1])
    return new_mem, new_mom


def _block_pass(cfg, p, carry: TitansCache, xb, cont, docid, mems, which):
    """Retrieve -> attend -> write keys / values -> gradient factors for every token of a block at once, token
    (b, i) reading memory ``which[b, i]`` of ``mems`` (a pair of stacks [r b h k m], [r b h m k]). Returns the
    block's window entries, attention outputs, layer outputs, write keys and gradient factors."""
    c = cfg.titans
    dtype = common.dtype_of(cfg.dtype)
    sd = carry.mem1.dtype
    b, n = cont.shape
    h, k = carry.win_k.shape[2:]
    idx = jnp.arange(n)

    # 1. retrieve
    h_t = _select(_apply_tokens(*mems, xb["q_mem"].astype(sd)), which)                 # [b l h k]
    mem_tok = _project(cfg, h_t.reshape(b, n, h * k).astype(dtype), p["w_mem"])        # [b l d]
    km, vm = _project(cfg, mem_tok, p["w_k"]), _project(cfg, mem_tok, p["w_v"])        # [b l h k]
    # each position brings a memory entry and an input entry, in this order (as the cache's window)
    blk_k = jnp.stack([km, xb["kx"].astype(dtype)], axis=2).reshape(b, 2 * n, h, k)
    blk_v = jnp.stack([vm, xb["vx"].astype(dtype)], axis=2).reshape(b, 2 * n, h, k)

    # 2. attend over [persistent ++ carried window ++ this block]
    n_p, n_w = p["kp"].shape[0], carry.win_k.shape[1]
    keys = jnp.concatenate([jnp.broadcast_to(p["kp"], (b, n_p, h, k)).astype(dtype),
                            carry.win_k.astype(dtype), blk_k], axis=1)  # [b s h k]
    vals = jnp.concatenate([jnp.broadcast_to(p["vp"], (b, n_p, h, k)).astype(dtype),
                            carry.win_v.astype(dtype), blk_v], axis=1)
    # carried pair j sits window - 1 - j positions before the block: inside token i's window iff j >= i
    pair_w = jnp.arange(n_w) // 2
    ok_w = carry.win_valid[:, None, :] & cont[:, :, None] & (pair_w[None, None, :] >= idx[None, :, None])
    pair_b = jnp.arange(2 * n) // 2
    ok_b = ((pair_b[None, :] <= idx[:, None]) & (idx[:, None] - pair_b[None, :] < c.window))[None] \
        & (jnp.repeat(docid, 2, axis=1)[:, None, :] == docid[:, :, None])
    ok = jnp.concatenate([jnp.ones((b, n, n_p), bool), ok_w, ok_b], axis=2)  # [b l s]
    logits = jnp.einsum("blhk,bshk->bhls", xb["q"].astype(sd), keys.astype(sd)) * k ** -0.5
    logits = jnp.where(ok[:, None], logits, -jnp.inf)
    attn = jnp.einsum("bhls,bshk->blhk", jax.nn.softmax(logits, axis=-1), vals.astype(sd))  # [b l h k]
    y = _project(cfg, attn.reshape(b, n, h * k).astype(dtype), p["w_o"])                    # [b l d]

    # 3. what the update needs: write keys / values and the gradient factors at each token's memory
    kw = l2_normalize(_project(cfg, y, p["w_wk"])).astype(sd)                               # [b l h k]
    vw = _project(cfg, y, p["w_wv"]).astype(sd)
    factors = _select(memory_grad_factors(*mems, kw, vw), which)
    return blk_k, blk_v, attn, y, kw, factors


def _chunk_block(cfg, p, carry: TitansCache, xb, *, aligned: bool):
    """One block of l = chunk_size positions (all rows), of which the first ``xb['n_valid']`` are tokens (the
    rest pad the call's last block). Returns the carry after the last token and (y, attn)."""
    c = cfg.titans
    start = xb["start"]  # [b l]
    n = start.shape[1]
    n_valid = xb["n_valid"]  # scalar int32
    idx = jnp.arange(n)
    docid = jnp.cumsum(start.astype(jnp.int32), axis=1)  # 0: the document continued from the carry
    cont = docid == 0
    last_start = jax.lax.cummax(jnp.where(start, idx, -1), axis=1)
    pos = jnp.where(cont, carry.pos[:, None] + idx, idx - last_start)  # [b l] position in the document
    # the continued document's chunk boundary in this block (n = none): at most one, since l = chunk_size
    r = jnp.min(jnp.where(cont & (pos % c.chunk_size == 0), idx, n), axis=1)  # [b]
    late = cont & (idx[None] >= r[:, None])  # reads the memory written by the block's tokens before r
    init = p["init_mem"]
    mem, mom, seg = (carry.mem1, carry.mem2), (carry.mom1, carry.mom2), (carry.seg1, carry.seg2)
    gates = (xb["log_keep"], xb["log_eta"], xb["theta"])
    stack = lambda *ms: tuple(jnp.stack(ws) for ws in zip(*ms))

    # The state after the last token comes from the run of its document in the block, which starts from the
    # carry (the continued document) or from the initial memory.
    last = n_valid - 1
    cont_last = jax.lax.dynamic_index_in_dim(cont, last, axis=1, keepdims=False)  # [b]
    lo = jnp.maximum(jax.lax.dynamic_index_in_dim(last_start, last, axis=1, keepdims=False), 0)
    pick = lambda a, b_: jax.tree.map(lambda u, v: jnp.where(cont_last[:, None, None, None], u, v), a, b_)
    zeros = jax.tree.map(jnp.zeros_like, mom)
    last_run = (pick(mem, init), pick(mom, zeros), lo, jnp.full_like(lo, n_valid))

    if aligned:
        # Every chunk starts at a block start: the continued document reads the carried memory throughout.
        mem_at_r = mem
        outs = _block_pass(cfg, p, carry, xb, cont, docid, stack(init, mem), cont.astype(jnp.int32))
    else:
        # Tokens read the initial memory (0), the carried chunk-start memory (1) or the memory at r (2). The
        # tokens before r read 0 or 1 only: a first pass gives them, and from their gradients the memory at r.
        first = _block_pass(cfg, p, carry, xb, cont, docid, stack(init, seg), cont.astype(jnp.int32))
        mem_at_r = _run_update(mem, mom, jnp.zeros_like(r), r, *gates, first[-2], first[-1])[0]
        outs = _block_pass(cfg, p, carry, xb, cont, docid, stack(init, seg, mem_at_r),
                           jnp.where(late, 2, cont.astype(jnp.int32)))
    blk_k, blk_v, attn, y, kw, factors = outs
    new_mem, new_mom = _run_update(*last_run, *gates, kw, factors)
    # its chunk reads the memory at r if it is the continued document past its boundary
    new_seg = pick(jax.tree.map(lambda u, v: jnp.where((r < n)[:, None, None, None], u, v), mem_at_r, seg), init)
    n_w = carry.win_k.shape[1]
    window = lambda old, new: jax.lax.dynamic_slice_in_dim(jnp.concatenate([old, new], axis=1), 2 * n_valid, n_w, 1)
    new = TitansCache(
        mem1=new_mem[0], mem2=new_mem[1], seg1=new_seg[0], seg2=new_seg[1], mom1=new_mom[0], mom2=new_mom[1],
        win_k=window(carry.win_k, blk_k.astype(carry.win_k.dtype)),
        win_v=window(carry.win_v, blk_v.astype(carry.win_v.dtype)),
        win_valid=window(carry.win_valid & cont_last[:, None], jnp.repeat(idx, 2)[None, :] >= lo[:, None]),
        pos=jax.lax.dynamic_index_in_dim(pos, last, axis=1, keepdims=False).astype(jnp.int32) + 1,
        last_segment=carry.last_segment)
    return new, (y, attn)


def _chunked_scan(cfg, p, cache: TitansCache, xs, *, aligned: bool):
    """All tokens of a call, block by block: xs holds [b t ...] arrays. Returns (cache, y [b t d], attn [b t h k]).

    A length that is not a multiple of chunk_size is padded at the end with one-token documents (start=True),
    which no token attends to; the carry of the last block is taken after its last real token."""
    size = cfg.titans.chunk_size
    b, t = xs["start"].shape
    n_blocks = -(-t // size)
    pad = n_blocks * size - t
    xs = {name: jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2), constant_values=(name == "start"))
          for name, a in xs.items()}
    blocks = jax.tree.map(lambda a: jnp.moveaxis(a.reshape((b, n_blocks, size) + a.shape[2:]), 1, 0), xs)
    blocks["n_valid"] = jnp.minimum(size, t - size * jnp.arange(n_blocks)).astype(jnp.int32)
    body = lambda carry, xb: _chunk_block(cfg, p, carry, xb, aligned=aligned)
    if cfg.titans.get("remat", True):  # keep only the carry of each block for the backward pass
        body = jax.checkpoint(body)
    cache, (y, attn) = jax.lax.scan(body, cache, blocks)
    y, attn = (jnp.moveaxis(a, 0, 1).reshape((b, n_blocks * size) + a.shape[3:])[:, :t] for a in (y, attn))
    return cache, y, attn
