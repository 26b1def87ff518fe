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
    bias_update_rate: gamma of bias_i += gamma * sign(target_i - load_i).
    """
    return ml_collections.ConfigDict(dict(router_hidden=64, window=512, target_mix=(0.25, 0.25, 0.25, 0.25),
                                          capacity_factor=(1.25, 1.25, 1.25, 1.25), overflow_mode=0,
                                          bias_balance=True, bias_update_rate=1e-2))


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


def admit(chosen, allow, starts, count0):
    """Same as ``admit_reference`` as one associative scan (O(log t) depth).

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
    prev = jnp.concatenate([count0[:, None, :].astype(jnp.int32), cnt[:, :-1]], axis=1)
    prev = jnp.where(r, 0, prev)
    return (cnt > prev), cnt


def route_modes(chosen, allow, starts, count0, overflow_mode: int, *, impl: str = "scan"):
    """chosen [b t] -> (mode each token runs [b t] int32, slot count before each token [b t 4], final counts
    [b 4], overflowed [b t] bool). Overflowing tokens go to ``overflow_mode`` (never capped)."""
    fn = admit if impl == "scan" else admit_reference
    ok, cnt = fn(chosen, allow, starts, count0)
    admitted = jnp.take_along_axis(ok, chosen[..., None], axis=-1)[..., 0]  # [b t]
    mode = jnp.where(admitted, chosen, overflow_mode).astype(jnp.int32)
    # Overflow tokens are counted in their fallback mode (uncapped, so this changes no admission above).
    extra = ((~admitted)[..., None] & (jnp.arange(4) == overflow_mode)).astype(jnp.int32)
    cnt = cnt + _segment_cumsum(extra, starts)
    before = cnt - (jax.nn.one_hot(mode, 4, dtype=jnp.int32))
    return mode, before, cnt[:, -1], ~admitted


def _segment_cumsum(x, starts):
    """Inclusive cumsum over axis 1 of [b t ...] restarting at starts [b t]."""
    r = jnp.broadcast_to(starts.reshape(starts.shape + (1,) * (x.ndim - 2)), x.shape)

    def compose(e1, e2):
        return jnp.where(e2[1], e2[0], e1[0] + e2[0]), e1[1] | e2[1]

    return jax.lax.associative_scan(compose, (x, r), axis=1)[0]


def update_bias(bias: jax.Array, load: jax.Array, target: jax.Array, rate: float) -> jax.Array:
    """Aux-loss-free balancing toward a target mix: bias_i += rate * sign(target_i - load_i); load, target [4]
    are fractions of tokens."""
    return bias + rate * jnp.sign(target - load).astype(bias.dtype)


# ------------------------------------------------------------------------------------------------- modules

class _ModeAttention(nn.Module):
    """Q/K/V/O projections and RoPE of one attention mode (m1 and m2 keep their own weights)."""

    cfg: ml_collections.FrozenConfigDict

    def qkv(self, x, positions):
        cfg, a = self.cfg, self.cfg.attention
        h, g, hd = a.num_heads, a.num_kv_heads, a.head_dim
        q = common.dense(cfg, (h, hd), ("embed", "heads", "head_dim"), name="q_proj")(x)   # [b t h k]
        k = common.dense(cfg, (g, hd), ("embed", "kv_heads", "head_dim"), name="k_proj")(x)  # [b t g k]
        v = common.dense(cfg, (g, hd), ("embed", "kv_heads", "head_dim"), name="v_proj")(x)  # [b t g k]
        if a.position == "rope":
            inv_freq = pos_lib.rope_frequencies(hd, a.rope_theta, a.rope_scaling_factor)
            q = pos_lib.apply_rope(q, positions, inv_freq)
            k = pos_lib.apply_rope(k, positions, inv_freq)
        return q, k, v

    def out(self, o):
        b, t, h, hd = o.shape
        return common.dense(self.cfg, self.cfg.d_model, ("heads", "embed"), name="o_proj")(
            o.astype(common.dtype_of(self.cfg.dtype)).reshape(b, t, h * hd))

    @nn.compact
    def __call__(self, x, positions, attend_fn):
        q, k, v = self.qkv(x, positions)
        o, extra = attend_fn(q, k, v)
        return self.out(o), extra


def _visible(q_pos, k_pos, window: int):
    """[b t s]: key slot present (pos >= 0), not after the query, and inside the window when window > 0."""
    delta = q_pos[:, :, None] - k_pos[:, None, :]
    ok = (k_pos[:, None, :] >= 0) & (delta >= 0)
    if window:
        ok &= delta < window
    return ok


def full_capacity(cfg, max_len: int) -> int:
    """Slots of the m2 cache: the most tokens the full-attention mode can admit in max_len positions."""
    u = capacity_units(cfg.chimera)[FULL]
    return max_len if u >= CAPACITY_UNIT else min(max_len, (max_len * u + CAPACITY_UNIT - 1) // CAPACITY_UNIT)


class Chimera(nn.Module):
    """The CHIMERA mixer (see the module docstring); follows the sequence-mixer contract."""

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
            seg = None
        else:
            starts = common.segment_starts(segment_ids, t, b)
            if positions is None:
                # Position within the document: steps since the last document start.
                idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
                positions = idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
            count0 = jnp.zeros((b, 4), jnp.int32)
            seg = segment_ids
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
        gate = jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), mode[..., None], axis=-1)  # [b t 1]

        # m0: the SSM consumes every token.
        y_ssm, ssm_cache = mamba2.Mamba2(cfg, name="ssm")(x, segment_ids=segment_ids,
                                                          cache=None if cache is None else cache.ssm, decode=decode)

        # m1 / m2: keys of other modes get position -1, which every mask treats as an empty slot.
        def attn_fn(m, window, kv_cache, slots_of):
            def fn(q, k, v):
                k_pos = jnp.where(mode == m, positions, -1)
                if kv_cache is None:
                    mask = _visible(positions, k_pos, window)
                    mask &= jnp.tril(jnp.ones((t, t), bool))[None]
                    if seg is not None:
                        mask &= seg[:, :, None] == seg[:, None, :]
                    return attend(q, k, v, mask), None
                k_all = jnp.concatenate([kv_cache.k.astype(k.dtype), k], axis=1)  # [b s+t g k]
                v_all = jnp.concatenate([kv_cache.v.astype(v.dtype), v], axis=1)
                pos_all = jnp.concatenate([kv_cache.pos, k_pos], axis=1)      # [b s+t]
                out = attend(q, k_all, v_all, _visible(positions, pos_all, window))
                return out, _write(kv_cache, k, v, k_pos, slots_of(k_pos), t, ring=window > 0)
            return fn

        window = c.window
        win_cache = None if cache is None else cache.window
        full_cache = None if cache is None else cache.full

        def ring_slots(k_pos):
            size = win_cache.k.shape[1]
            return jnp.where(k_pos >= 0, k_pos % size, size)  # size = out of range = not written

        def compact_slots(k_pos):
            return jnp.where(k_pos >= 0, before[..., FULL], full_cache.k.shape[1])

        y_win, new_win = _ModeAttention(cfg, name="window_attn")(x, positions,
                                                                 attn_fn(WINDOW, window, win_cache, ring_slots))
        y_full, new_full = _ModeAttention(cfg, name="full_attn")(x, positions,
                                                                 attn_fn(FULL, 0, full_cache, compact_slots))

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
