"""Decode cost at long context: a dense transformer against CHIMERA models of the same width and depth.

    python experiments/bench_decode.py --out=experiments/results             # one GPU: 125m shapes, 32K context
    python experiments/bench_decode.py --smoke --out=/tmp/bench_decode_smoke  # tiny shapes on CPU (tested)

Models: ``dense`` (every layer full attention), ``chimera`` (target mix 0.25 per mode) and ``chimera-cheap``
(target mix 0.4 ssm / 0.3 window / 0.1 full / 0.2 identity: mostly the modes whose cost does not grow with the
context), each also as ``-skip`` (``decode_skip_unchosen``: an attention mode no row chose is not computed). For
every model and batch size (1 and 16) it allocates the decode cache for ``context + steps`` tokens, fills it as if
``context`` tokens had been consumed, then times ``steps`` one-token decode steps of the whole LM
(embedding, every layer, logits) under jit with the cache donated (updated in place, as a server would), after
warm-up. Reported per batch size, in one table each: the cache bytes actually allocated (the sum of the cache
arrays' sizes, and the device allocator's growth where it reports one), decode tokens/s (batch * steps /
seconds), and both as ratios against dense. Weights are random: speed and memory do not depend on training.

Synthetic context (documented equivalent of a 32K prefill, which the benchmark does not need to time): a dense
layer's cache holds every position 0..context-1 with random K/V. A CHIMERA layer's fill follows its own rules:
modes are drawn per token from the target mix and passed through the capacity rule (``chimera.route_modes``),
the full-attention buffer holds the admitted m2 tokens in order, the ring buffer the m1 tokens of the last W
positions, the SSM a random state, the per-mode counters the counts of that draw. Decode then attends over
exactly the tokens of each mode, as after a real prefill of the same routing.

Routing during the timed steps: the decoded tokens are random (not the argmax, which with random weights soon
repeats one token and so one route), and the router's balancing bias is first calibrated toward the target mix by
the model's own aux-loss-free rule (``chimera.update_bias``, rate ``--calib_rate``) over ``--calib_steps`` decode
steps at the largest batch; the timed steps then run with that bias (averaged over the second half of the
calibration) frozen and record the mix they actually ran (column "decoded mix"). Compilations are shared: one
decode program per (model, batch) serves calibration and timing.

Writes ``bench_decode.{md,json}`` (with device, library versions and per-phase seconds) to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from chimera_jax.layers import attention, chimera  # noqa: E402
from chimera_jax.models.lm import LM  # noqa: E402
from configs import lm as lm_configs  # noqa: E402

CHIMERA_VARIANTS = {
    # name: model.chimera overrides. The balanced and the cheap mix (chimera.MIXES), each decoding as the model
    # config's default does (both attention modes on every step), and each skipping an attention mode no row chose
    # (lax.switch, m2 read up to its filled part), for what that buys on a given device.
    "chimera": dict(mix="balanced", decode_skip_unchosen=False),
    "chimera-cheap": dict(mix="cheap", decode_skip_unchosen=False),
    "chimera-skip": dict(mix="balanced", decode_skip_unchosen=True, decode_read_block=1024),
    "chimera-cheap-skip": dict(mix="cheap", decode_skip_unchosen=True, decode_read_block=1024),
}
DEFAULT_MODELS = ("dense", "chimera", "chimera-cheap", "chimera-skip", "chimera-cheap-skip")


def model_cfgs(size: str, smoke: bool, names=DEFAULT_MODELS, calib_rate: float = 0.05
               ) -> dict[str, ml_collections.FrozenConfigDict]:
    out = {}
    for name in names:
        m = lm_configs.model_config("dense" if name == "dense" else "chimera", size)
        if smoke:
            m.num_layers, m.d_model, m.ffn_dim, m.vocab_size = 2, 32, 64, 64
            m.attention.num_heads, m.attention.num_kv_heads, m.attention.head_dim = 2, 1, 16
            m.dtype = m.param_dtype = "float32"
        if name != "dense":
            over = dict(CHIMERA_VARIANTS[name])
            m.chimera.target_mix, m.chimera.capacity_factor = chimera.MIXES[over.pop("mix")]
            m.chimera.update(over)
            m.chimera.window = 8 if smoke else 512
            m.chimera.bias_update_rate = calib_rate  # only the calibration steps update the bias
            if smoke:
                m.mamba2.d_state, m.mamba2.head_dim = 8, 32
        out[name] = ml_collections.FrozenConfigDict(m)
    return out


def _fill_kv(c: attention.KVCache, pos: np.ndarray, slots: np.ndarray, context: int, key) -> attention.KVCache:
    """pos [b n] absolute positions written at slots [b n] (numpy), random K/V everywhere."""
    k = jax.random.normal(key, c.k.shape, jnp.float32).astype(c.k.dtype)
    v = jax.random.normal(jax.random.fold_in(key, 1), c.v.shape, jnp.float32).astype(c.v.dtype)
    p = np.full(c.pos.shape, -1, np.int32)
    rows = np.arange(p.shape[0])[:, None]
    p[rows, slots] = pos
    return attention.KVCache(k=k, v=v, pos=jnp.asarray(p), index=jnp.full(c.index.shape, context, jnp.int32))


_route = jax.jit(chimera.route_modes, static_argnums=4)


def fill_cache(cfg, cache, context: int, seed: int = 0):
    """The per-layer caches as after consuming ``context`` tokens (see the module docstring)."""
    key = jax.random.PRNGKey(seed)
    out = []
    for i, c in enumerate(cache):
        key_i = jax.random.fold_in(key, i)
        b = c.index.shape[0]
        if isinstance(c, attention.KVCache):
            pos = np.broadcast_to(np.arange(context, dtype=np.int32), (b, context))
            out.append(_fill_kv(c, pos, pos, context, key_i))
            continue
        assert isinstance(c, chimera.ChimeraCache), type(c)
        rng = np.random.default_rng([seed, i])
        chosen = rng.choice(4, (b, context), p=np.asarray(cfg.chimera.target_mix))
        positions = np.broadcast_to(np.arange(context, dtype=np.int32), (b, context))
        units = jnp.asarray(chimera.capacity_units(cfg.chimera), jnp.int32)
        mode, _, count, _ = _route(jnp.asarray(chosen, jnp.int32), chimera.allowance(jnp.asarray(positions), units),
                                   jnp.asarray(positions == 0), jnp.zeros((b, 4), jnp.int32),
                                   cfg.chimera.overflow_mode)
        mode = np.asarray(mode)
        w = c.window.k.shape[1]
        full_pos = [np.flatnonzero(mode[r] == chimera.FULL) for r in range(b)]
        n_full = min(min(len(f) for f in full_pos), c.full.k.shape[1])
        fp = np.stack([f[:n_full] for f in full_pos])
        full = _fill_kv(c.full, fp, np.broadcast_to(np.arange(n_full), fp.shape), context, key_i)
        # Rows admitted more m2 tokens than the common n_full: their count must say what the buffer holds.
        count = np.asarray(count).copy()
        count[:, chimera.FULL] = n_full
        win_p = np.full((b, w), -1, np.int32)
        last = np.arange(max(0, context - cfg.chimera.window), context)
        for r in range(b):
            lr = last[mode[r, last] == chimera.WINDOW]
            win_p[r, lr % w] = lr
        win = _fill_kv(c.window, win_p, np.broadcast_to(np.arange(w), (b, w)), context, jax.random.fold_in(key_i, 2))
        ssm = jax.tree.map(lambda a, key=key_i: (0.1 * jax.random.normal(key, a.shape, jnp.float32)).astype(a.dtype)
                           if jnp.issubdtype(a.dtype, jnp.floating) else a, c.ssm)
        out.append(chimera.ChimeraCache(ssm=ssm, window=win, full=full, count=jnp.asarray(count),
                                        index=jnp.full((b,), context, jnp.int32)))
    return tuple(out)


def cache_bytes(cache) -> int:
    return int(sum(a.nbytes for a in jax.tree.leaves(cache)))


def _bytes_in_use():
    try:
        return jax.devices()[0].memory_stats()["bytes_in_use"]
    except Exception:  # CPU and some backends report no allocator statistics
        return None


def make_step(model):
    """One decode step: (params, stats, tokens [b 1], cache) -> (argmax tokens, updated stats, cache, modes [L b]).

    The stats returned are the bias after the balancing update; calibration feeds them back, timing does not.
    The argmax is returned so that the logits (the LM head) stay in the timed program.
    """
    def step(params, stats, tok, cache):
        (logits, cache), upd = model.apply({"params": params, **stats}, tok, cache=cache, decode=True,
                                           mutable=["chimera_stats", "intermediates"])
        modes = [a[:, 0] for a in jax.tree.leaves(upd.get("intermediates", {}))]
        modes = jnp.stack(modes).astype(jnp.int8) if modes else jnp.zeros((0, tok.shape[0]), jnp.int8)
        new_stats = {k: v for k, v in upd.items() if k == "chimera_stats"}
        return jnp.argmax(logits[:, -1], -1).astype(jnp.int32), new_stats, cache, modes

    return jax.jit(step, donate_argnums=3)


def bench_model(name, cfg, batches, context, steps, warmup, calib_steps, seed=0):
    """Rows (one per batch size) for one model; the largest batch first, which also calibrates the router."""
    model = LM(cfg)
    t0 = time.perf_counter()
    # Parameters are initialised on the host CPU and then moved: the values do not depend on the device, and
    # compiling the CHIMERA LM's parallel path on the GPU only to draw random weights took over two minutes there.
    with jax.default_device(jax.devices("cpu")[0]):
        variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
    variables = jax.device_put(variables, jax.devices()[0])
    params = variables["params"]
    stats = {k: v for k, v in variables.items() if k == "chimera_stats"}
    init_s = time.perf_counter() - t0
    step = make_step(model)
    n_params = int(sum(x.size for x in jax.tree.leaves(params)))
    is_chimera = "chimera" in cfg
    rows = []
    for j, batch in enumerate(sorted(batches, reverse=True)):
        timing = dict(init_s=init_s if j == 0 else 0.0)
        key = jax.random.PRNGKey(seed + batch)
        calib = calib_steps if (is_chimera and j == 0) else 0
        n_tok = calib + warmup + steps
        toks = list(jax.random.randint(key, (n_tok, batch, 1), 0, cfg.vocab_size, jnp.int32))

        def fresh(batch=batch, timing=timing):
            t = time.perf_counter()
            c = jax.block_until_ready(fill_cache(cfg, model.init_cache(batch, context + warmup + steps + 1), context,
                                                 seed))
            timing["fill_s"] = timing.get("fill_s", 0.0) + time.perf_counter() - t
            return c

        before = _bytes_in_use()
        cache = fresh()
        after = _bytes_in_use()
        nbytes = cache_bytes(cache)
        t = time.perf_counter()
        jax.block_until_ready(step(params, stats, toks[0], cache)[1])  # compile (the donated cache is consumed)
        timing["compile_s"] = time.perf_counter() - t
        cache = fresh()
        if calib:
            # The balancer's own rule, fed back step by step, on the real cache at the largest batch.
            # The sign rule makes the bias jitter by +-rate around its balance point; the timed steps use the
            # bias averaged over the second half of the calibration.
            t = time.perf_counter()
            total = None
            for i in range(calib):
                _, stats, cache, _ = step(params, stats, toks[i], cache)
                if i >= calib // 2:
                    total = stats if total is None else jax.tree.map(jnp.add, total, stats)
            n_avg = calib - calib // 2
            stats = jax.block_until_ready(jax.tree.map(lambda a, n=n_avg: a / n, total))
            timing["calib_s"] = time.perf_counter() - t
            cache = fresh()
        for i in range(calib, calib + warmup):
            tok, _, cache, _ = step(params, stats, toks[i], cache)
        jax.block_until_ready((tok, cache))
        modes = []
        t = time.perf_counter()
        for i in range(calib + warmup, n_tok):
            tok, _, cache, m = step(params, stats, toks[i], cache)
            modes.append(m)
        jax.block_until_ready((tok, cache))
        dt = time.perf_counter() - t
        mix = None
        if is_chimera:
            mm = np.stack([np.asarray(m) for m in modes]).ravel()
            mix = (np.bincount(mm, minlength=4) / mm.size).tolist()
        rows.append(dict(model=name, batch=batch, context=context, steps=steps, cache_bytes=nbytes,
                         allocator_growth_bytes=None if before is None or after is None else int(after - before),
                         tokens_per_s=batch * steps / dt, ms_per_step=1e3 * dt / steps, params=n_params,
                         target_mix=list(cfg.chimera.target_mix) if is_chimera else None, decoded_mix=mix,
                         bias=np.asarray(stats["chimera_stats"]["layer_0"]["mixer"]["bias"]).tolist()
                         if is_chimera and "layer_0" in stats.get("chimera_stats", {}) else None,
                         seconds=timing))
        del cache
    return rows


def _mib(x):
    return "" if x is None else f"{x / 2**20:.1f}"


def report(rows, meta, out):
    os.makedirs(out, exist_ok=True)
    by = {(r["model"], r["batch"]): r for r in rows}
    lines = [f"# Decode cost at context {meta['context']}", "",
             f"device: {meta['device']}; jax {meta['jax']}, flax {meta['flax']}, python {meta['python']}; "
             f"shapes `{meta['size']}`{' (smoke)' if meta['smoke'] else ''}; {meta['steps']} timed decode steps "
             f"after {meta['warmup']} warm-up; router bias calibrated over {meta['calib_steps']} steps; "
             f"total {meta['wall_s']:.0f} s.", ""]
    for batch in sorted({r["batch"] for r in rows}):
        lines += [f"## batch {batch}", "",
                  ("| model | target mix | decoded mix (ssm/win/full/id) | params | cache MiB | allocator growth MiB "
                   "| KV ratio dense/model | tokens/s | ms/step | speed ratio model/dense |"),
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["batch"] == batch):
            d = by.get(("dense", batch))
            kv = d["cache_bytes"] / r["cache_bytes"] if d else float("nan")
            sp = r["tokens_per_s"] / d["tokens_per_s"] if d else float("nan")
            r["kv_ratio_vs_dense"], r["speed_ratio_vs_dense"] = kv, sp
            fmt = lambda mix: "-" if mix is None else "/".join(f"{x:.2f}" for x in mix)  # noqa: E731
            lines.append(f"| {r['model']} | {fmt(r['target_mix'])} | {fmt(r['decoded_mix'])} | "
                         f"{r['params'] / 1e6:.1f}M | {_mib(r['cache_bytes'])} | "
                         f"{_mib(r['allocator_growth_bytes']) or 'n/a'} | {kv:.2f}x | {r['tokens_per_s']:.1f} | "
                         f"{r['ms_per_step']:.2f} | {sp:.2f}x |")
        lines.append("")
    lines += ["Claim under test: KV ratio >= 3x and speed ratio >= 1.8x at 32K.",
              ("A CHIMERA decode step advances the SSM for every token and computes both attention modes (the "
               "default); a `-skip` model runs an attention mode only when some row of the batch chose it (a "
               "conditional per mode and layer, reading the m2 buffer only up to its filled part).")]
    with open(os.path.join(out, "bench_decode.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "bench_decode.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print("\n".join(lines))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--smoke", action="store_true", help="tiny shapes and context (CPU)")
    p.add_argument("--size", default="125m")
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,16; smoke: 1,2)")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help=f"of dense,{','.join(CHIMERA_VARIANTS)}")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--calib_steps", type=int, default=200)
    p.add_argument("--calib_rate", type=float, default=0.05)
    args = p.parse_args(argv)
    if args.smoke:
        args.context, args.steps, args.warmup, args.calib_steps = 48, 4, 1, 8
    args.batches = args.batches or ("1,2" if args.smoke else "1,16")
    import flax

    t0 = time.perf_counter()
    dev = jax.devices()[0]
    meta = dict(device=f"{dev.platform}: {getattr(dev, 'device_kind', '')}", jax=jax.__version__,
                flax=flax.__version__, python=platform.python_version(), size=args.size, smoke=args.smoke,
                context=args.context, steps=args.steps, warmup=args.warmup, calib_steps=args.calib_steps,
                calib_rate=args.calib_rate)
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    for name, cfg in model_cfgs(args.size, args.smoke, args.models.split(","), args.calib_rate).items():
        for row in bench_model(name, cfg, batches, args.context, args.steps, args.warmup, args.calib_steps):
            rows.append(row)
            print(json.dumps(row), flush=True)
            # The table is rewritten after every row, so a run cut by a time limit keeps what it measured.
            meta["wall_s"] = time.perf_counter() - t0
            report(_ordered(rows, args.models), meta, args.out)
    return _ordered(rows, args.models)


def _ordered(rows, models):
    order = {n: i for i, n in enumerate(models.split(","))}
    return sorted(rows, key=lambda r: (r["batch"], order[r["model"]]))


if __name__ == "__main__":
    main()
