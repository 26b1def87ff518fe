"""Synthetic recall tasks as LM batches: multi-query associative recall (MQAR) and needle-in-a-haystack (NIAH).

MQAR, in the form of the Zoology study (Arora et al., 2023): a row starts with P key-value pairs
``k_1 v_1 ... k_P v_P`` (keys drawn without replacement from the lower half of the vocabulary, values from the
upper half), then every key appears once more as a query at position ``2P + 2 g`` where the gaps g are drawn
without replacement from 0 .. (T - 2P) / 2 - 1 with probability proportional to ``a (g + 1)^(a - 1)`` (a power
law: with a small ``a`` most queries come soon after the pairs). The target at a query position is the value of
that key; every other position is masked out of the loss. Non-query positions hold token 0, or (Zoology's
default) uniformly random tokens.

NIAH: a haystack of random filler tokens with one needle ``NEEDLE k v_1 .. v_L`` at a random depth and, at the
end, ``QUERY k``; the model must continue with ``v_1 .. v_L`` (the targets of the last L positions). Lengths up
to 32K (and beyond) are fine: rows are generated one at a time.

Both are grain ``MapDataset``s of batches ``inputs/targets/segment_ids/positions/loss_mask`` [b t], so the 'lm'
stage trains on them unchanged (``data.source = 'mqar' | 'niah'``); its eval accuracy is the recall accuracy.
MQAR batches are drawn whole with array operations over the batch (``mqar_batch``; ``mqar_example`` is the row by
row reference it is tested against); a fresh-data batch is a pure function of (seed, split, batch index), a NIAH
row of (seed, split, row index): the iterator is checkpointable and resumes exactly. A small fixed MQAR training
set (``num_train_examples``) is drawn once, in batches, and its rows are shuffled and repeated.
"""
from __future__ import annotations

import numpy as np
import grain
import ml_collections

_TRAIN, _EVAL = 0, 1


def mqar_config() -> ml_collections.ConfigDict:
    """Sub-block ``data.mqar``.

    vocab_size: tokens in use (keys from [1, V/2), values from [V/2, V); 0 is the blank token).
    num_kv_pairs: P.   power_a: exponent a of the gap distribution.   random_non_queries: fill the non-query
    positions with random tokens (else 0).   num_train_examples: size of the fixed training set (0 = a fresh
    example every time).
    """
    return ml_collections.ConfigDict(dict(vocab_size=8192, num_kv_pairs=8, power_a=0.01, random_non_queries=True,
                                          num_train_examples=0))


def niah_config() -> ml_collections.ConfigDict:
    """Sub-block ``data.niah``.

    vocab_size: tokens in use; the last two ids are the NEEDLE and QUERY markers, keys and values are drawn from
    [1, V - 2).   value_len: L, tokens of the needle's value.   min_depth, max_depth: range of the needle's
    position as a fraction of the haystack.
    """
    return ml_collections.ConfigDict(dict(vocab_size=1024, value_len=2, min_depth=0.0, max_depth=1.0))


def _mqar_shape(vocab_size: int, seq_len: int, num_kv_pairs: int) -> tuple[int, int]:
    """(space, half): the number of query slots after the pairs, and the first value token; checks both fit."""
    p, t = num_kv_pairs, seq_len
    space = (t - 2 * p) // 2
    if space < p:
        raise ValueError(f"MQAR: seq_len={t} leaves room for {space} queries after {p} pairs; need at least {p} "
                         f"(seq_len >= 4 * num_kv_pairs)")
    half = vocab_size // 2
    if half - 1 < p:
        raise ValueError(f"MQAR: vocab_size={vocab_size} has {half - 1} key tokens for {p} pairs")
    return space, half


def _gap_weights(space: int, power_a: float) -> np.ndarray:
    """[space] unnormalised probabilities a (g + 1)^(a - 1) of the gaps g = 0 .. space - 1."""
    return power_a * np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1)


def mqar_example(rng: np.random.Generator, *, vocab_size: int, seq_len: int, num_kv_pairs: int,
                 power_a: float = 0.01, random_non_queries: bool = True) -> dict[str, np.ndarray]:
    """One MQAR row: inputs, targets, loss_mask [t] (targets and mask are 0 off the query positions).

    The row-by-row reference of ``mqar_batch`` (which draws from the same distribution, whole batches at once)."""
    p, t = num_kv_pairs, seq_len
    context = 2 * p
    space, half = _mqar_shape(vocab_size, seq_len, num_kv_pairs)
    keys = rng.choice(np.arange(1, half), p, replace=False)
    values = rng.choice(np.arange(half, vocab_size), p, replace=False)
    weights = _gap_weights(space, power_a)
    gaps = rng.choice(space, p, replace=False, p=weights / weights.sum())
    qpos = context + 2 * gaps                                  # [p] query positions

    inputs = np.zeros(t, np.int32)
    inputs[0:context:2], inputs[1:context:2] = keys, values
    inputs[qpos] = keys
    targets = np.zeros(t, np.int32)
    targets[qpos] = values
    mask = np.zeros(t, np.float32)
    mask[qpos] = 1.0
    if random_non_queries:
        blank = np.ones(t, bool)
        blank[:context] = False
        blank[qpos] = False
        inputs[blank] = rng.integers(0, vocab_size, blank.sum())
    return dict(inputs=inputs, targets=targets, loss_mask=mask)


def _ordered_sample(rng: np.random.Generator, rows: int, n: int, k: int,
                    weights: np.ndarray | None = None) -> np.ndarray:
    """[rows k] int: per row, k distinct items of range(n) in the order of a draw without replacement.

    This is what ``rng.choice(n, k, replace=False, p=weights / weights.sum())`` draws for one row (weights None:
    uniform), for many rows at once:
    - weighted: every item gets an exponential arrival time E / w (E ~ Exp(1)); the k earliest, earliest first,
      are distributed exactly as k successive draws without replacement with probability proportional to w among
      the items left (the exponential race). argpartition keeps it O(n) per row instead of a full sort.
    - uniform: k independent uniform draws per row, redrawing the rows that repeat an item (given that they are
      distinct, k uniform draws are a uniform ordered k-subset). Taken while a row is accepted with probability
      >= 1/8; below that, the race with equal weights.
    """
    if weights is None:
        accept = np.exp(np.log1p(-np.arange(k) / n).sum())
        if accept >= 0.125:
            out = rng.integers(0, n, (rows, k))
            while True:
                s = np.sort(out, axis=1)
                bad = (s[:, 1:] == s[:, :-1]).any(axis=1)                      # [b] rows with a repeat
                if not bad.any():
                    return out
                out[bad] = rng.integers(0, n, (int(bad.sum()), k))
        weights = np.ones(n)
    arrival = rng.standard_exponential((rows, n)) / weights                       # [b n]
    first = np.argpartition(arrival, k - 1, axis=1)[:, :k] if k < n else np.broadcast_to(np.arange(n), (rows, n))
    order = np.argsort(np.take_along_axis(arrival, first, axis=1), axis=1)
    return np.take_along_axis(first, order, axis=1)                               # [b k]


def mqar_batch(rng: np.random.Generator, batch_size: int, *, vocab_size: int, seq_len: int, num_kv_pairs: int,
               power_a: float = 0.01, random_non_queries: bool = True) -> dict[str, np.ndarray]:
    """``batch_size`` MQAR rows at once: inputs, targets [b t] int32, loss_mask [b t] float32.

    Same distribution as ``batch_size`` calls of ``mqar_example`` (not the same random stream): array operations
    over the batch instead of one Python-level row at a time, which kept small models waiting on the host.
    """
    b, p, t = batch_size, num_kv_pairs, seq_len
    context = 2 * p
    space, half = _mqar_shape(vocab_size, seq_len, num_kv_pairs)
    keys = 1 + _ordered_sample(rng, b, half - 1, p)                                   # [b p]
    values = half + _ordered_sample(rng, b, vocab_size - half, p)                      # [b p]
    gaps = _ordered_sample(rng, b, space, p, _gap_weights(space, power_a))             # [b p]
    qpos = context + 2 * gaps                                                          # [b p] query positions

    inputs = np.zeros((b, t), np.int32)
    inputs[:, 0:context:2], inputs[:, 1:context:2] = keys, values
    np.put_along_axis(inputs, qpos, keys, axis=1)
    targets = np.zeros((b, t), np.int32)
    np.put_along_axis(targets, qpos, values, axis=1)
    mask = np.zeros((b, t), np.float32)
    np.put_along_axis(mask, qpos, 1.0, axis=1)
    if random_non_queries:
        blank = mask == 0
        blank[:, :context] = False
        inputs = np.where(blank, rng.integers(0, vocab_size, (b, t), dtype=np.int32), inputs)
    return dict(inputs=inputs, targets=targets, loss_mask=mask)


def niah_example(rng: np.random.Generator, *, vocab_size: int, seq_len: int, value_len: int = 2,
                 min_depth: float = 0.0, max_depth: float = 1.0) -> dict[str, np.ndarray]:
    """One NIAH row: filler, ``NEEDLE k v``, filler, ``QUERY k v[:-1]``; targets v on the last L positions."""
    needle, query = vocab_size - 2, vocab_size - 1
    n_needle = 2 + value_len                 # NEEDLE k v_1..v_L
    n_tail = 2 + value_len - 1               # QUERY k v_1..v_{L-1}
    hay = seq_len - n_needle - n_tail
    if hay < 0:
        raise ValueError(f"NIAH: seq_len={seq_len} is shorter than the needle and query ({n_needle + n_tail})")
    if not 0.0 <= min_depth <= max_depth <= 1.0:
        raise ValueError(f"NIAH: need 0 <= min_depth <= max_depth <= 1, got {min_depth}, {max_depth}")
    key = rng.integers(1, vocab_size - 2)
    value = rng.integers(1, vocab_size - 2, value_len)
    inputs = rng.integers(1, vocab_size - 2, seq_len).astype(np.int32)
    at = int(round(rng.uniform(min_depth, max_depth) * hay))
    inputs[at:at + n_needle] = np.r_[needle, key, value]
    tail = seq_len - n_tail
    inputs[tail:] = np.r_[query, key, value[:-1]]
    targets = np.zeros(seq_len, np.int32)
    targets[tail + 1:] = value
    mask = np.zeros(seq_len, np.float32)
    mask[tail + 1:] = 1.0
    return dict(inputs=inputs, targets=targets, loss_mask=mask)


class SyntheticTokenizer:
    """Token ids are symbols: every id counts as one 'byte' (so eval bpb is nats per token / ln 2)."""

    pad_id = bos_id = eos_id = 0

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str) -> np.ndarray:
        return np.asarray([int(s) for s in text.split()], np.int32)

    def decode(self, ids) -> str:
        return " ".join(str(int(i)) for i in np.asarray(ids).reshape(-1))

    def decode_bytes(self, ids) -> bytes:
        return (self.decode(ids) + " ").encode()

    @property
    def token_bytes(self) -> np.ndarray:
        return np.ones(self.vocab_size, np.int32)


# Host-side reading: one background thread drawing a few batches ahead is enough for a vectorised batch, and keeps
# many small runs sharing a machine's cores from each starting grain's default of 16 threads and 500 buffered
# elements. ``data.read_threads`` / ``data.prefetch_batches`` override these (0 threads = draw on the main thread).
READ_THREADS, PREFETCH_BATCHES = 1, 8


def _task(data_cfg):
    """(sub-block, its generator's keyword arguments without the rng) for ``data.source``."""
    if data_cfg.source == "mqar":
        c = data_cfg.mqar
        return c, dict(vocab_size=c.vocab_size, seq_len=data_cfg.seq_len, num_kv_pairs=c.num_kv_pairs,
                       power_a=c.power_a, random_non_queries=c.random_non_queries)
    if data_cfg.source == "niah":
        c = data_cfg.niah
        return c, dict(vocab_size=c.vocab_size, seq_len=data_cfg.seq_len, value_len=c.value_len,
                       min_depth=c.min_depth, max_depth=c.max_depth)
    raise ValueError(f"data.source must be 'mqar' or 'niah' here, got {data_cfg.source!r}")


def _one_document(ex: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Adds segment_ids (all 1: one document) and positions (0 .. t-1) of the shape of ``ex['inputs']``."""
    shape = ex["inputs"].shape
    ex["segment_ids"] = np.ones(shape, np.int32)
    ex["positions"] = np.ascontiguousarray(np.broadcast_to(np.arange(shape[-1], dtype=np.int32), shape))
    return ex


def _mqar_batch_fn(data_cfg, seed: int, split: int):
    """index -> the MQAR batch drawn from the rng of (seed, split, index)."""
    _, kw = _task(data_cfg)
    b = data_cfg.batch_size
    return lambda index: _one_document(mqar_batch(np.random.default_rng([seed, split, int(index)]), b, **kw))


def _niah_row_fn(data_cfg, seed: int, split: int):
    """index -> the NIAH row drawn from the rng of (seed, split, index)."""
    _, kw = _task(data_cfg)
    return lambda index: _one_document(niah_example(np.random.default_rng([seed, split, int(index)]), **kw))


def _mqar_fixed_set(data_cfg, seed: int, n: int) -> dict[str, np.ndarray]:
    """The first n rows of the fresh training stream, [n t] each: drawn once, in batches."""
    make = _mqar_batch_fn(data_cfg, seed, _TRAIN)
    chunks = [make(i) for i in range(-(-n // data_cfg.batch_size))]
    return {k: np.concatenate([c[k] for c in chunks])[:n] for k in chunks[0]}


def dataset(data_cfg, *, seed: int, split: str = "train") -> grain.MapDataset:
    """Batches [b t] of the configured task; 'train' is endless (or a fixed set repeated), 'eval' has
    ``data.eval_batches`` batches drawn from a stream disjoint from training."""
    b = data_cfg.batch_size
    _task(data_cfg)  # fail early on an unknown source
    if data_cfg.source == "mqar":
        if split != "train":
            return grain.MapDataset.range(data_cfg.eval_batches).map(_mqar_batch_fn(data_cfg, seed, _EVAL))
        n = data_cfg.mqar.num_train_examples
        if not n:
            return grain.MapDataset.range(1 << 40).map(_mqar_batch_fn(data_cfg, seed, _TRAIN))
        rows = _mqar_fixed_set(data_cfg, seed, n)
        # Batches of shuffled row indices, then one gather per batch.
        index = grain.MapDataset.range(n).shuffle(seed=seed).repeat().batch(b, drop_remainder=True)
        return index.map(lambda i: {k: v[np.asarray(i)] for k, v in rows.items()})
    if split == "train":
        return grain.MapDataset.range(1 << 40).map(_niah_row_fn(data_cfg, seed, _TRAIN)).batch(b, drop_remainder=True)
    rows = grain.MapDataset.range(data_cfg.eval_batches * b).map(_niah_row_fn(data_cfg, seed, _EVAL))
    return rows.batch(b, drop_remainder=True)


def build(data_cfg, *, seed: int, vocab_size: int):
    """``LMData`` for ``data.source = 'mqar' | 'niah'`` (called by ``lm_pipeline.build``)."""
    from chimera_jax.data.lm_pipeline import LMData

    task_cfg, _ = _task(data_cfg)
    task_vocab = task_cfg.vocab_size
    if task_vocab > vocab_size:
        raise ValueError(f"data.{data_cfg.source}.vocab_size={task_vocab} exceeds model.vocab_size={vocab_size}")
    threads = int(data_cfg.get("read_threads", READ_THREADS))
    buffer = int(data_cfg.get("prefetch_batches", PREFETCH_BATCHES))
    if threads < 0 or buffer < 0:
        raise ValueError(f"data.read_threads={threads} and data.prefetch_batches={buffer} must be >= 0")
    train = dataset(data_cfg, seed=seed, split="train").to_iter_dataset(
        grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffer))
    eval_batches = list(dataset(data_cfg, seed=seed, split="eval"))
    return LMData(tokenizer=SyntheticTokenizer(task_vocab), train=iter(train), eval_batches=eval_batches)
