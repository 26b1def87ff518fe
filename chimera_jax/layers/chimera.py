"""CHIMERA: a per-token, per-layer router over four sequence mixers (a mixture of mixers).

Modes (top-1 per token):  m0 SSM (Mamba-2, ``layers/mamba2.py``),  m1 sliding-window attention of width W,
m2 full causal attention,  m3 identity (the mixer adds nothing: the residual stream passes unchanged).

    logits = W2 silu(W1 x)                                   # [b t 4], the router MLP (full precision)
    chosen = argmax(logits + bias)                           # bias: aux-loss-free balancing, selection only
    mode   = capacity(chosen)                                # overflow -> ``overflow_mode`` (deterministic)
    y      = softmax(logits)[mode] * mixer_mode(x)           # the router learns through the chosen gate value

Rules that hold identically in the parallel path, prefill and decode:
- The SSM runs on every token (its state advances whatever the token chose), so its recurrence stays the plain
  Mamba-2 recurrence; only the tokens in m0 take its output.
- An attention mode's keys are the tokens that *run* that mode: key j is visible to query i iff mode_j = m,
  same document, j <= i, and (m1 only) pos_i - pos_j < W. The multi-mode cache stores each token's K/V only in
  the cache of its mode: m2 appends to a compact buffer (one slot per admitted m2 token, so its size is the m2
  capacity, not the context), m1 keeps a ring buffer of W slots (slot = position mod W), m0 its fixed state,
  m3 nothing.
- Capacity: a mode i with fraction c_i = min(1, capacity_factor_i * target_mix_i) < 1 admits the token at
  document position p iff fewer than ceil(c_i (p + 1)) tokens of the document were admitted to it before
  (first come first served in token order). This is causal, so a decode step decides exactly as the parallel
  path does, and it bounds the m2 cache by ceil(c_2 * max_len). c_i is held in units of 1/1024 so that every
  path (and the cache sizing) uses the same integer arithmetic. ``overflow_mode`` itself is never capped.
- Padding (segment id 0) is routed to identity and counted nowhere.

Cost: training runs both attention modes as one attention call (each token with its own mode's Q/K/V, keys
masked to the query's mode) in query chunks, so memory is O(b h c t) for a chunk of c queries, not O(b h t t)
per mode. Decode advances the SSM and computes both attention modes on every token (each over its own cache);
with ``decode_skip_unchosen`` it runs an attention mode only if some row of the batch chose it and reads the m2
buffer only up to its filled part, which on an H100 cost more in conditionals than it saved (see the config).

Aux-loss-free balancing (the rule of Wang et al., 2024, used by ``layers/moe.py``, here toward a target mix
rather than toward equal loads): after each training forward pass ``bias_i += rate * sign(target_i - load_i)``
with ``load_i`` the fraction of the step's tokens that chose mode i. ``moe.update_bias`` pulls toward the mean
load and is applied outside the model, so the target-mix rule is written here (``update_bias``); it is applied
inside the forward pass whenever the ``chimera_stats`` collection is mutable (the LM stage passes
``mutable=list(state.model_state.keys())``), so the bias rides in ``TrainState.model_state``.

Sown (when the collection is mutable): ``metrics`` mix_ssm, mix_window, mix_full, mix_identity (fraction of the
non-padding tokens that ran each mode) and overflow (fraction that overflowed a capacity); ``intermediates``
modes [b t] (the mode each token ran, for ``chimera_jax.inspect_router``).
"""
from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections

from chimera_jax.layers import common, mamba2, positions as pos_lib
from chimera_jax.layers.attention import KVCache, attend

MODES = ("ssm", "window", "full", "identity")
SSM, WINDOW, FULL, IDENTITY = range(4)
CAPACITY_UNIT = 1024   # capacity fractions are integers in units of 1/1024 (exact in every path)
_UNCAPPED = 1 << 30    # an allowance no count reaches
# Named mode mixes (target_mix, capacity_factor) used by the experiments: "balanced" is the layer's default;
# "cheap" asks for mostly the modes whose decode cost does not grow with the context (ssm, window, identity).
MIXES = {"balanced": ((0.25, 0.25, 0.25, 0.25), (1.25, 1.25, 1.25, 1.25)),
         "cheap": ((0.4, 0.3, 0.1, 0.2), (1.0, 1.0, 1.25, 1.0))}


def default_config() -> ml_collections.ConfigDict:
    """Sub-block ``chimera`` of the model config (the mixer also reads ``model.attention`` for heads, head_dim and
    RoPE of its two attention modes, and ``model.mamba2`` for its SSM mode).

    router_hidden: width of the router MLP's hidden layer.
    window: W of the sliding-window mode m1 (its cache is a ring buffer of W slots).
    target_mix: the mode loads (m0 ssm, m1 window, m2 full, m3 identity) the balancer steers toward; sums to 1.
    capacity_factor: per mode; a mode may take at most min(1, capacity_factor * target_mix) of a document's
      tokens (running budget, first come first served); a fraction of 1 means uncapped.
    overflow_mode: where a token that overflows its mode's capacity goes: 0 (ssm, already computed on every
      token) or 3 (identity); this mode is never capped.
    bias_balance: steer selection with the balancing bias (False keeps the bias out of selection).
    bias_update_rate: gamma of bias_i += gamma * sign(target_i - load_i); 1e-3 as the MoE's. At 1e-2 the MQAR
      runs oscillated (a key's mode flips, so the full-attention queries lose it) and reached 2-89% where 1e-3
      reached 98.8-99.8%; at 1e-3 one repeat of those cells still stalled at 65% (mqar_sweep_h100.md).
    decode_skip_unchosen: in decode, compute an attention mode only when some row's token chose it (lax.switch);
      False (the default) computes both modes on every step. On an H100 at 32K context skipping was the slower
      choice: an XLA conditional on the GPU waits for its predicate on the host, and two per layer per step cost
      more than the attention they skip (ms per step skipping against not, balanced / cheap mix: batch 1 10.23 /
      5.77 against 4.95 / 5.44, batch 16 7.91 / 4.96 against 7.03 / 4.13; experiments/results/bench_decode.md).
      It may pay where conditionals are cheap (TPU) or at longer contexts.
    decode_read_block: with decode_skip_unchosen, read the full-attention cache only up to its filled part
      rounded up to decode_read_block * 4^k slots (at most the capacity); 0 reads the whole buffer every step.
    """
    target_mix, capacity_factor = MIXES["balanced"]
    return ml_collections.ConfigDict(dict(router_hidden=64, window=512, target_mix=target_mix,
                                          capacity_factor=capacity_factor, overflow_mode=0,
                                          bias_balance=True, bias_update_rate=1e-3, decode_skip_unchosen=False,
                                          decode_read_block=1024))


@flax.struct.dataclass
class ChimeraCache:
    ssm: mamba2.Mamba2Cache  # m0: conv inputs and SSD state, advanced by every token
    window: KVCache          # m1: ring buffer [b W g k] of the tokens that ran the window mode
    full: KVCache            # m2: compact buffer [b S2 g k], S2 = capacity of m2 over max_len
    count: jax.Array         # [b 4] int32 tokens admitted to each mode so far in the current document
    index: jax.Array         # [b] int32 tokens consumed (= position of the next token)


# ------------------------------------------------------------------------------------------------ capacity

def capacity_units(c) -> tuple[int, int, int, int]:
    """Per-mode capacity fraction in units of 1/CAPACITY_UNIT (CAPACITY_UNIT = uncapped); validates the block."""
    target, factor = tuple(c.target_mix), tuple(c.capacity_factor)
    if len(target) != 4 or len(factor) != 4:
        raise ValueError(f"model.chimera.target_mix and capacity_factor need 4 entries (one per mode {MODES}); "
                         f"got {target} and {factor}")
    if any(x < 0 for x in target) or abs(sum(target) - 1.0) > 1e-6:
        raise ValueError(f"model.chimera.target_mix must be non-negative and sum to 1; got {target}")
    if c.overflow_mode not in (SSM, IDENTITY):
        raise ValueError(f"model.chimera.overflow_mode must be 0 (ssm) or 3 (identity); got {c.overflow_mode}")
    units = []
    for i, (tm, cf) in enumerate(zip(target, factor)):
        if cf <= 0:
            raise ValueError(f"model.chimera.capacity_factor[{i}] must be > 0; got {cf}")
        u = CAPACITY_UNIT if i == c.overflow_mode else int(round(min(1.0, cf * tm) * CAPACITY_UNIT))
        units.append(max(u, 1))  # a mode with a zero target still admits the first token of a document
    return tuple(units)


def allowance(positions: jax.Array, units: jax.Array) -> jax.Array:
    """[b t 4] int32: ceil(c_i (p + 1)), the most tokens mode i may hold after the token at position p."""
    p1 = positions[..., None].astype(jnp.int32) + 1
    capped = (p1 * units + (CAPACITY_UNIT - 1)) // CAPACITY_UNIT
    return jnp.where(units >= CAPACITY_UNIT, _UNCAPPED, capped)


def admit_reference(chosen, allow, starts, count0):
    """The oracle: a token-by-token scan of the counters. chosen [b t] int, allow [b t 4], starts [b t] bool,
    count0 [b 4] -> (admitted [b t 4] bool, counts after each token [b t 4])."""
    def step(cnt, xs):
        ch, al, st = xs  # [b 4] [b 4] [b]
        cnt = jnp.where(st[:, None], 0, cnt)
        ok = ch & (cnt < al)
        cnt = cnt + ok.astype(cnt.dtype)
        return cnt, (ok, cnt)

    onehot = jax.nn.one_hot(chosen, 4, dtype=jnp.int32) > 0
    xs = jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), (onehot, allow, starts))
    _, (ok, cnt) = jax.lax.scan(step, count0.astype(jnp.int32), xs)
    return jnp.moveaxis(ok, 0, 1), jnp.moveaxis(cnt, 0, 1)


def admit_associative(chosen, allow, starts, count0):
    """Same as ``admit_reference`` as one associative scan (O(log t) depth); ``admit`` falls back to it for
    sequences too long for its int32 offsets.

    Since the count never exceeds the (non-decreasing) allowance, one step is x -> min(x + a_t, u_t), and after a
    document start x -> min(a_t, u_t). Maps of the form x -> min((0 if r else x) + A, U) compose in closed form:
    (A1, U1, r1) then (A2, U2, r2) = (A2, U2, True) if r2 else (A1 + A2, min(U1 + A2, U2), r1).
    """
    a = (jax.nn.one_hot(chosen, 4, dtype=jnp.int32) > 0).astype(jnp.int32)  # [b t 4]
    r = jnp.broadcast_to(starts[..., None], a.shape)

    def compose(e1, e2):
        a1, u1, r1 = e1
        a2, u2, r2 = e2
        return (jnp.where(r2, a2, a1 + a2), jnp.where(r2, u2, jnp.minimum(u1 + a2, u2)), r1 | r2)

    A, U, R = jax.lax.associative_scan(compose, (a, allow.astype(jnp.int32), r), axis=1)
    cnt = jnp.minimum(jnp.where(R, 0, count0[:, None, :]) + A, U)  # [b t 4]
    return _admitted(cnt, count0, r), cnt


# admit's offsets reach t (t + 2) in int32; past this length it takes the associative scan.
_ADMIT_CLOSED_FORM_MAX_T = 46_000


def admit(chosen, allow, starts, count0):
    """Same as ``admit_reference`` in closed form: a few cumulative sums and minima over t.

    Why: the associative scan's log-depth tree of slices and selects was a large share of the training graph
    (compile time, and one small kernel per level on GPU); cumsum / cummin are one op each.

    Since the count never exceeds the (non-decreasing) allowance, one step is x_t = min(x_{t-1} + a_t, u_t), with
    x = x0 before the document (count0 for the document the row continues, 0 for a document starting in the row).
    With A_t the document's choices up to t, y_t = x_t - A_t obeys y_t = min(y_{t-1}, u_t - A_t), hence
        x_t = A_t + x0 + min(0, min_{s in the document, s <= t} (u_s - A_s - x0)).
    The in-document minimum is one cummin over the row after lowering each document's values by
    (document index) * (t + 1): the terms w = u - A - x0 lie in [-t, 0] once clipped at 0 (the min with 0 is
    taken anyway; w >= -t because x0 <= u, the same invariant as above), so an earlier document never wins.
    """
    t = chosen.shape[1]
    if t > _ADMIT_CLOSED_FORM_MAX_T:
        return admit_associative(chosen, allow, starts, count0)
    a = (jax.nn.one_hot(chosen, 4, dtype=jnp.int32) > 0).astype(jnp.int32)    # [b t 4]
    r = jnp.broadcast_to(starts[..., None], a.shape)
    A = _segment_cumsum(a, starts)                                             # [b t 4]
    doc = jnp.cumsum(starts, axis=1, dtype=jnp.int32)[..., None]               # [b t 1] documents started so far
    x0 = jnp.where(doc == 0, count0[:, None, :].astype(jnp.int32), 0)          # [b t 4]
    w = jnp.clip(allow.astype(jnp.int32) - A - x0, -t, 0)
    step = t + 1
    low = jax.lax.cummin(w - doc * step, axis=1) + doc * step                  # in-document running minimum
    cnt = A + x0 + low
    return _admitted(cnt, count0, r), cnt


def _admitted(cnt, count0, r):
    """[b t 4] bool: the count rose at this token (its choice was admitted); r [b t 4] marks document starts."""
    prev = jnp.concatenate([count0[:, None, :].astype(jnp.int32), cnt[:, :-1]], axis=1)
    prev = jnp.where(r, 0, prev)
    return cnt > prev


def route_modes(chosen, allow, starts, count0, overflow_mode: int, *, impl: str = "scan"):
    """chosen [b t] -> (mode each token runs [b t] int32, slot count before each token [b t 4], final counts
    [b 4], overflowed [b t] bool). Overflowing tokens go to ``overflow_mode`` (never capped)."""
    fn = admit if impl == "scan" else admit_reference
    ok, cnt = fn(chosen, allow, starts, count0)
    chosen_1h = jax.nn.one_hot(chosen, 4, dtype=jnp.int32) > 0                 # [b t 4]
    admitted = jnp.any(ok & chosen_1h, axis=-1)                                # [b t] (a select, not a gather)
    mode = jnp.where(admitted, chosen, overflow_mode).astype(jnp.int32)
    # Overflow tokens are counted in their fallback mode (uncapped, so this changes no admission above).
    extra = ((~admitted)[..., None] & (jnp.arange(4) == overflow_mode)).astype(jnp.int32)
    cnt = cnt + _segment_cumsum(extra, starts)
    before = cnt - (jax.nn.one_hot(mode, 4, dtype=jnp.int32))
    return mode, before, cnt[:, -1], ~admitted


def _segment_cumsum(x, starts):
    """Inclusive cumsum over axis 1 of non-negative int [b t ...] restarting at starts [b t]: the row's cumsum
    less its value just before the latest start (a cummax, since that cumsum never decreases)."""
    r = jnp.broadcast_to(starts.reshape(starts.shape + (1,) * (x.ndim - 2)), x.shape)
    c = jnp.cumsum(x, axis=1, dtype=x.dtype)
    return c - jax.lax.cummax(jnp.where(r, c - x, 0), axis=1)


def update_bias(bias: jax.Array, load: jax.Array, target: jax.Array, rate: float) -> jax.Array:
    """Aux-loss-free balancing toward a target mix: bias_i += rate * sign(target_i - load_i); load, target [4]
    are fractions of tokens."""
    return bias + rate * jnp.sign(target - load).astype(bias.dtype)


# ------------------------------------------------------------------------------------------------ attention

LOGITS_BUDGET = 1 << 29  # bytes of float32 logits one query chunk of the parallel path / prefill may hold


def query_chunk(b: int, h: int, t: int, s: int, budget: int | None = None) -> int:
    """Queries per chunk such that one chunk's [b h c s] float32 logits fit in ``budget`` bytes (default
    LOGITS_BUDGET; t if all fit); a power of two otherwise, so that common sequence lengths split without
    padding."""
    budget = LOGITS_BUDGET if budget is None else budget
    per_query = b * h * s * 4
    if t * per_query <= budget:
        return t
    c = max(1, budget // per_query)
    return 1 << (c.bit_length() - 1)


def attend_chunked(q, k, v, visible, q_aux, k_aux, chunk: int):
    """``attend(q, k, v, visible(q_aux, k_aux))`` computed ``chunk`` queries at a time.

    q [b t h k], k/v [b s g k]; q_aux a tuple of [b t] arrays, k_aux a tuple of [b s] arrays; visible(q_aux,
    k_aux) -> [b t s] bool. Each query row's softmax is the same computation as in one call, so the result is
    identical; what changes is memory: the [b h c s] logits and mask live for one chunk at a time, and the chunk
    body is rematerialised in the backward pass, so neither the forward nor the backward holds O(t s) per head.
    """
    b, t = q.shape[:2]
    if chunk >= t:
        return attend(q, k, v, visible(q_aux, k_aux))
    n = -(-t // chunk)
    pad = n * chunk - t

    def split(a):  # [b t ...] -> [n b c ...]; padded queries see garbage and are sliced off below
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        return jnp.moveaxis(a.reshape(b, n, chunk, *a.shape[2:]), 1, 0)

    @jax.checkpoint
    def one(args):
        qc, aux = args
        return attend(qc, k, v, visible(aux, k_aux))

    out = jax.lax.map(one, (split(q), tuple(split(a) for a in q_aux)))  # [n b c h k]
    return jnp.moveaxis(out, 0, 1).reshape(b, n * chunk, *q.shape[2:])[:, :t]


def _visible(q_pos, k_pos, window: int):
    """[b t s]: key slot present (pos >= 0), not after the query, and inside the window when window > 0."""
    delta = q_pos[:, :, None] - k_pos[:, None, :]
    ok = (k_pos[:, None, :] >= 0) & (delta >= 0)
    if window:
        ok &= delta < window
    return ok


def mode_visible(window: int):
    """Mask of the parallel path's one attention call over both attention modes (see ``Chimera``):
    aux = (mode, position, index, segment) [b t] each; key j is visible to query i iff both ran the same
    attention mode (m1 or m2), same document, j <= i (index and position), and pos_i - pos_j < W when that mode
    is m1. A query of m0 / m3 sees nothing (its output is zero and unused)."""
    def visible(qa, ka):
        q_mode, q_pos, q_idx, q_seg = qa
        k_mode, k_pos, k_idx, k_seg = ka
        delta = q_pos[:, :, None] - k_pos[:, None, :]
        k_attn = (k_mode == WINDOW) | (k_mode == FULL)
        ok = (q_mode[:, :, None] == k_mode[:, None, :]) & k_attn[:, None, :]
        ok &= (delta >= 0) & (q_idx[:, :, None] >= k_idx[:, None, :]) & (q_seg[:, :, None] == k_seg[:, None, :])
        return ok & ((q_mode != WINDOW)[:, :, None] | (delta < window))
    return visible


def read_lengths(capacity: int, block: int) -> tuple[int, ...]:
    """The static read lengths of the m2 cache in decode: block * 4^k below the capacity, then the capacity
    (block 0: the capacity only). A step reads the shortest one holding every filled slot, so it touches at
    most 4x the filled part (at least ``block`` slots) instead of the whole buffer.

    Why static lengths under a lax.switch rather than a loop over blocks up to the filled length: a while loop
    with a data-dependent trip count costs a device-to-host round trip per block on GPU plus an online-softmax
    rescale per block, whereas a switch decides once per layer and reads in one pass. Each length is one more
    compiled copy of the attention read, hence the factor 4 between lengths (few copies, quick compiles).
    """
    out, n = [], block
    while block and n < capacity:
        out.append(n)
        n *= 4
    return tuple(out) + (capacity,)


# ------------------------------------------------------------------------------------------------- modules

def rope(cfg, q, k, positions):
    """RoPE of both attention modes (they share model.attention), or nothing for position 'none'."""
    a = cfg.attention
    if a.position != "rope":
        return q, k
    inv_freq = pos_lib.rope_frequencies(a.head_dim, a.rope_theta, a.rope_scaling_factor)
    return pos_lib.apply_rope(q, positions, inv_freq), pos_lib.apply_rope(k, positions, inv_freq)


class _ModeAttention(nn.Module):
    """Q/K/V/O projections and RoPE of one attention mode (m1 and m2 keep their own weights). Defined in setup so
    that the parent can call ``qkv`` and ``out`` separately (one attention call serves both modes in training,
    and decode runs them inside a lax.switch)."""

    cfg: ml_collections.FrozenConfigDict

    def setup(self):
        cfg, a = self.cfg, self.cfg.attention
        h, g, hd = a.num_heads, a.num_kv_heads, a.head_dim
        self.q_proj = common.dense(cfg, (h, hd), ("embed", "heads", "head_dim"))
        self.k_proj = common.dense(cfg, (g, hd), ("embed", "kv_heads", "head_dim"))
        self.v_proj = common.dense(cfg, (g, hd), ("embed", "kv_heads", "head_dim"))
        self.o_proj = common.dense(cfg, cfg.d_model, ("heads", "embed"))

    def qkv(self, x, positions):
        q, k, v = self.projections(x)
        q, k = rope(self.cfg, q, k, positions)
        return q, k, v

    def projections(self, x):
        """Q, K, V before RoPE: [b t h k] [b t g k] [b t g k]."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def out(self, o):
        b, t, h, hd = o.shape
        return self.o_proj(o.astype(common.dtype_of(self.cfg.dtype)).reshape(b, t, h * hd))


def _decode_branches(cfg, lengths: tuple[int, ...], window: int):
    """lax.switch branches of one attention mode in decode: 0 skips the mode (no row's token chose it: nothing
    is projected, read or written, only the index advances), 1 + i writes the new token into its slot and then
    reads the first lengths[i] slots. Writing first is exact for one token: its own key must be visible, and the
    ring slot it overwrites held position p - W, which the window excludes anyway."""
    dtype = common.dtype_of(cfg.dtype)

    def skip(mdl, x, positions, kv, k_pos, slots):
        return jnp.zeros(x.shape[:2] + (cfg.d_model,), dtype), kv.replace(index=kv.index + 1)

    def read(n):
        def branch(mdl, x, positions, kv, k_pos, slots):
            q, k, v = mdl.qkv(x, positions)
            kv = _write(kv, k, v, k_pos, slots, 1, ring=False)
            o = attend(q, kv.k[:, :n].astype(q.dtype), kv.v[:, :n].astype(q.dtype),
                       _visible(positions, kv.pos[:, :n], window))
            return mdl.out(o), kv
        return branch

    return [skip] + [read(n) for n in lengths]


def full_capacity(cfg, max_len: int) -> int:
    """Slots of the m2 cache: the most tokens the full-attention mode can admit in max_len positions."""
    u = capacity_units(cfg.chimera)[FULL]
    return max_len if u >= CAPACITY_UNIT else min(max_len, (max_len * u + CAPACITY_UNIT - 1) // CAPACITY_UNIT)


class Chimera(nn.Module):
    """The CHIMERA mixer (see the module docstring); follows the sequence-mixer contract.

    Training (no cache): the SSM over every token, then ONE attention call for both attention modes: each token
    takes the Q/K/V of its own mode, and the mask lets a query see only keys of its own mode (``mode_visible``),
    in query chunks (``attend_chunked``) so no [b h t t] tensor is held. Prefill (a cache, t > 1): per mode over
    (cache ++ new keys), chunked likewise. Decode (t = 1): the SSM always; each attention mode inside a
    lax.switch that skips it when no row chose it and otherwise reads only the filled part of its cache.
    """

    cfg: ml_collections.FrozenConfigDict

    def _check(self):
        cfg = self.cfg
        for block in ("chimera", "attention", "mamba2"):
            if block not in cfg:
                raise ValueError(f"the CHIMERA mixer needs the config sub-block model.{block}")
        if cfg.attention.position not in ("rope", "none"):
            raise ValueError(f"the CHIMERA mixer supports model.attention.position 'rope' or 'none', "
                             f"got {cfg.attention.position!r}")
        if cfg.attention.num_heads % cfg.attention.num_kv_heads:
            raise ValueError(f"model.attention.num_heads={cfg.attention.num_heads} must be a multiple of "
                             f"num_kv_heads={cfg.attention.num_kv_heads}")
        if cfg.chimera.window <= 0:
            raise ValueError(f"model.chimera.window must be > 0, got {cfg.chimera.window}")
        if cfg.chimera.get("decode_read_block", 0) < 0:
            raise ValueError(f"model.chimera.decode_read_block must be >= 0, got {cfg.chimera.decode_read_block}")
        return capacity_units(cfg.chimera)

    def init_cache(self, batch: int, max_len: int, dtype) -> ChimeraCache:
        self._check()
        a = self.cfg.attention

        def kv(size):
            shape = (batch, size, a.num_kv_heads, a.head_dim)
            return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                           pos=jnp.full((batch, size), -1, jnp.int32), index=jnp.zeros((batch,), jnp.int32))

        return ChimeraCache(ssm=mamba2.Mamba2(self.cfg, parent=None).init_cache(batch, max_len, dtype),
                            window=kv(min(max_len, self.cfg.chimera.window)),
                            full=kv(full_capacity(self.cfg, max_len)),
                            count=jnp.zeros((batch, 4), jnp.int32), index=jnp.zeros((batch,), jnp.int32))

    @nn.compact
    def __call__(self, x, *, segment_ids=None, positions=None, cache: ChimeraCache | None = None, decode=False):
        cfg, c = self.cfg, self.cfg.chimera
        units = jnp.asarray(self._check(), jnp.int32)
        b, t, d = x.shape
        if decode and t != 1:
            raise ValueError(f"decode=True consumes one token per call, got x of length {t}")
        if decode and cache is None:
            raise ValueError("decode=True needs a cache (Chimera.init_cache)")
        dtype, pdtype = common.dtype_of(cfg.dtype), common.dtype_of(cfg.param_dtype)

        valid = jnp.ones((b, t), bool) if segment_ids is None else segment_ids != 0
        if cache is not None:
            # As Attention's cache: each row holds one document, positions continue from the cache.
            positions = cache.index[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
            starts = positions == 0
            count0 = cache.count
        else:
            starts = common.segment_starts(segment_ids, t, b)
            if positions is None:
                # Position within the document: steps since the last document start.
                idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
                positions = idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
            count0 = jnp.zeros((b, 4), jnp.int32)
        positions = positions.astype(jnp.int32)

        # Router: full precision (also under ternary=True) since a flipped choice swaps a whole mixer.
        rdt = jnp.promote_types(x.dtype, jnp.float32)
        hr = c.router_hidden
        w1 = common.param(self, "router_in", nn.initializers.normal(d ** -0.5), (d, hr), ("embed", None), pdtype)
        w2 = common.param(self, "router_out", nn.initializers.normal(hr ** -0.5), (hr, 4), (None, None), pdtype)
        logits = nn.silu(x.astype(rdt) @ w1.astype(rdt)) @ w2.astype(rdt)  # [b t 4]
        bias_var = self.variable("chimera_stats", "bias", jnp.zeros, (4,), jnp.float32)
        bias = bias_var.value if c.bias_balance else jnp.zeros_like(bias_var.value)
        chosen = jnp.argmax(logits + jax.lax.stop_gradient(bias).astype(rdt), axis=-1).astype(jnp.int32)
        chosen = jnp.where(valid, chosen, IDENTITY)
        mode, before, count, overflow = route_modes(chosen, allowance(positions, units), starts, count0,
                                                    c.overflow_mode)
        mode = jnp.where(valid, mode, IDENTITY)
        # The chosen gate value as a select and a sum of one non-zero term (exact; a gather and its scatter-add
        # gradient cost more ops).
        gate = jnp.sum(jnp.where(jax.nn.one_hot(mode, 4, dtype=jnp.int32) > 0, jax.nn.softmax(logits, axis=-1), 0),
                       axis=-1, keepdims=True)  # [b t 1]

        # m0: the SSM consumes every token.
        y_ssm, ssm_cache = mamba2.Mamba2(cfg, name="ssm")(x, segment_ids=segment_ids,
                                                          cache=None if cache is None else cache.ssm, decode=decode)

        win_attn = _ModeAttention(cfg, name="window_attn")
        full_attn = _ModeAttention(cfg, name="full_attn")
        h = cfg.attention.num_heads
        if cache is None:
            y_win, y_full = self._parallel_attention(win_attn, full_attn, x, mode, positions, segment_ids)
            new_win = new_full = None
        elif decode:
            y_win, new_win = self._decode_attention(win_attn, WINDOW, x, mode, positions, before, count,
                                                    cache.window)
            y_full, new_full = self._decode_attention(full_attn, FULL, x, mode, positions, before, count,
                                                      cache.full)
        else:
            y_win, new_win = _prefill_attention(win_attn, WINDOW, c.window, x, mode, positions, before,
                                                cache.window, h)
            y_full, new_full = _prefill_attention(full_attn, FULL, 0, x, mode, positions, before, cache.full, h)

        g = gate.astype(dtype)
        y = jnp.where((mode == SSM)[..., None], g * y_ssm.astype(dtype),
                      jnp.where((mode == WINDOW)[..., None], g * y_win.astype(dtype),
                                jnp.where((mode == FULL)[..., None], g * y_full.astype(dtype), 0)))
        y = y.astype(dtype)

        if not self.is_initializing():
            validf = valid.astype(jnp.float32)
            n = jnp.maximum(validf.sum(), 1.0)
            ran = jax.nn.one_hot(mode, 4, dtype=jnp.float32) * validf[..., None]
            for i, name in enumerate(MODES):
                self.sow("metrics", f"mix_{name}", ran[..., i].sum() / n)
            self.sow("metrics", "overflow", (overflow & valid).astype(jnp.float32).sum() / n)
            self.sow("intermediates", "modes", mode)
            if c.bias_balance and self.is_mutable_collection("chimera_stats"):
                load = (jax.nn.one_hot(chosen, 4, dtype=jnp.float32) * validf[..., None]).sum((0, 1)) / n
                bias_var.value = update_bias(bias_var.value, load, jnp.asarray(c.target_mix, jnp.float32),
                                             c.bias_update_rate)

        new_cache = None
        if cache is not None:
            new_cache = ChimeraCache(ssm=ssm_cache, window=new_win, full=new_full, count=count,
                                     index=cache.index + t)
        return y, new_cache

    def _parallel_attention(self, win_attn, full_attn, x, mode, positions, segment_ids):
        """Both attention modes in one chunked attention call; returns (y_win, y_full) [b t d] (each valid on
        the tokens of its mode). A token of m1 queries with m1's Q over the K/V that m1's weights give the m1
        tokens, and likewise for m2, so the combined call equals the two separate masked calls on every token
        whose output is used, at half their cost and with no [b h t t] tensor held."""
        b, t, _ = x.shape
        qw, kw, vw = win_attn.projections(x)
        qf, kf, vf = full_attn.projections(x)
        is_win = (mode == WINDOW)[..., None, None]
        q, k, v = (jnp.where(is_win, a_w, a_f) for a_w, a_f in ((qw, qf), (kw, kf), (vw, vf)))
        # RoPE acts on each token alone, so rotating the selected Q/K once equals selecting the rotated ones.
        q, k = rope(self.cfg, q, k, positions)
        idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
        aux = (mode, positions, idx, seg)
        chunk = query_chunk(b, self.cfg.attention.num_heads, t, t)
        o = attend_chunked(q, k, v, mode_visible(self.cfg.chimera.window), aux, aux, chunk)
        return win_attn.out(o), full_attn.out(o)

    def _decode_attention(self, mdl, m, x, mode, positions, before, count, kv):
        """One attention mode for one decoded token: lax.switch over skip / read the first n slots."""
        c = self.cfg.chimera
        size = kv.k.shape[1]
        window = c.window if m == WINDOW else 0
        k_pos = jnp.where(mode == m, positions, -1)                            # [b 1]
        if m == WINDOW:
            slots = jnp.where(k_pos >= 0, k_pos % size, size)                  # ring slot; size = not written
            lengths = (size,)
            need = jnp.int32(size)
        else:
            slots = jnp.where(k_pos >= 0, before[..., FULL], size)             # compact slot = admission rank
            lengths = read_lengths(size, c.get("decode_read_block", 1024))
            need = jnp.max(count[:, FULL])                                     # filled slots after this token
        branches = _decode_branches(self.cfg, lengths, window)
        if self.is_initializing() or not c.get("decode_skip_unchosen", False):
            return branches[-1](mdl, x, positions, kv, k_pos, slots)           # the reference: always the whole
        bucket = jnp.sum(jnp.asarray(lengths[:-1], jnp.int32) < need)          # shortest length >= need
        index = jnp.where(jnp.any(mode == m), 1 + bucket, 0)
        return nn.switch(index, branches, mdl, x, positions, kv, k_pos, slots)


def _prefill_attention(mdl, m, window, x, mode, positions, before, kv, h):
    """One attention mode over (cached keys ++ new keys) for a chunk of t tokens, then the cache write."""
    b, t, _ = x.shape
    q, k, v = mdl.qkv(x, positions)
    k_pos = jnp.where(mode == m, positions, -1)                                # other modes: empty slots
    k_all = jnp.concatenate([kv.k.astype(k.dtype), k], axis=1)                 # [b s+t g k]
    v_all = jnp.concatenate([kv.v.astype(v.dtype), v], axis=1)
    pos_all = jnp.concatenate([kv.pos, k_pos], axis=1)                         # [b s+t]
    chunk = query_chunk(b, h, t, k_all.shape[1])
    o = attend_chunked(q, k_all, v_all, lambda qa, ka: _visible(qa[0], ka[0], window), (positions,), (pos_all,),
                       chunk)
    size = kv.k.shape[1]
    if window:
        slots = jnp.where(k_pos >= 0, k_pos % size, size)                      # ring slot; size = not written
    else:
        slots = jnp.where(k_pos >= 0, before[..., FULL], size)                 # compact slot = admission rank
    return mdl.out(o), _write(kv, k, v, k_pos, slots, t, ring=window > 0)


def _write(kv_cache: KVCache, k, v, k_pos, slots, t: int, *, ring: bool) -> KVCache:
    """Scatters the new keys of one mode into its cache (slots out of range are dropped).

    Ring buffer: only the last W new tokens can still be inside any later window, and their slots are distinct,
    so a call of more than W tokens writes just those (no two writes hit one slot). The compact m2 buffer gives
    every admitted token its own slot (its admission rank), so all of them are written.
    """
    if ring and kv_cache.k.shape[1] < t:
        keep = kv_cache.k.shape[1]
        k, v, k_pos, slots = k[:, -keep:], v[:, -keep:], k_pos[:, -keep:], slots[:, -keep:]
    rows = jnp.arange(k.shape[0])[:, None]
    return KVCache(k=kv_cache.k.at[rows, slots].set(k.astype(kv_cache.k.dtype), mode="drop"),
                   v=kv_cache.v.at[rows, slots].set(v.astype(kv_cache.v.dtype), mode="drop"),
                   pos=kv_cache.pos.at[rows, slots].set(k_pos, mode="drop"),
                   index=kv_cache.index + t)
