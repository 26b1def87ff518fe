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
Every row is a pure function of (seed, split, index): the iterator is checkpointable and resumes exactly.
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


def mqar_example(rng: np.random.Generator, *, vocab_size: int, seq_len: int, num_kv_pairs: int,
                 power_a: float = 0.01, random_non_queries: bool = True) -> dict[str, np.ndarray]:
    """One MQAR row: inputs, targets, loss_mask [t] (targets and mask are 0 off the query positions)."""
    p, t = num_kv_pairs, seq_len
    context = 2 * p
    space = (t - context) // 2
    if space < p:
        raise ValueError(f"MQAR: seq_len={t} leaves room for {space} queries after {p} pairs; need at least {p} "
                         f"(seq_len >= 4 * num_kv_pairs)")
    half = vocab_size // 2
    if half - 1 < p:
        raise ValueError(f"MQAR: vocab_size={vocab_size} has {half - 1} key tokens for {p} pairs")
    keys = rng.choice(np.arange(1, half), p, replace=False)
    values = rng.choice(np.arange(half, vocab_size), p, replace=False)
    weights = power_a * np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1)
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


def _row_fn(data_cfg, seed: int, split: int):
    t = data_cfg.seq_len
    if data_cfg.source == "mqar":
        c = data_cfg.mqar
        make = lambda rng: mqar_example(rng, vocab_size=c.vocab_size, seq_len=t, num_kv_pairs=c.num_kv_pairs,
                                        power_a=c.power_a, random_non_queries=c.random_non_queries)
    elif data_cfg.source == "niah":
        c = data_cfg.niah
        make = lambda rng: niah_example(rng, vocab_size=c.vocab_size, seq_len=t, value_len=c.value_len,
                                        min_depth=c.min_depth, max_depth=c.max_depth)
    else:
        raise ValueError(f"data.source must be 'mqar' or 'niah' here, got {data_cfg.source!r}")

    def row(index: int) -> dict[str, np.ndarray]:
        ex = make(np.random.default_rng([seed, split, int(index)]))
        ex["segment_ids"] = np.ones(t, np.int32)
        ex["positions"] = np.arange(t, dtype=np.int32)
        return ex

    return row, c.vocab_size


def dataset(data_cfg, *, seed: int, split: str = "train") -> grain.MapDataset:
    """Batches [b t] of the configured task; 'train' is endless (or a fixed set repeated), 'eval' has
    ``data.eval_batches`` batches drawn from a stream disjoint from training."""
    b = data_cfg.batch_size
    if split == "train":
        row, _ = _row_fn(data_cfg, seed, _TRAIN)
        n = data_cfg.mqar.num_train_examples if data_cfg.source == "mqar" else 0
        if n:
            rows = grain.MapDataset.range(n).shuffle(seed=seed).repeat()
        else:
            rows = grain.MapDataset.range(1 << 40)
        return rows.map(row).batch(b, drop_remainder=True)
    row, _ = _row_fn(data_cfg, seed, _EVAL)
    return grain.MapDataset.range(data_cfg.eval_batches * b).map(row).batch(b, drop_remainder=True)


def build(data_cfg, *, seed: int, vocab_size: int):
    """``LMData`` for ``data.source = 'mqar' | 'niah'`` (called by ``lm_pipeline.build``)."""
    from chimera_jax.data.lm_pipeline import LMData

    _, task_vocab = _row_fn(data_cfg, seed, _TRAIN)
    if task_vocab > vocab_size:
        raise ValueError(f"data.{data_cfg.source}.vocab_size={task_vocab} exceeds model.vocab_size={vocab_size}")
    train = dataset(data_cfg, seed=seed, split="train").to_iter_dataset()
    eval_batches = list(dataset(data_cfg, seed=seed, split="eval"))
    return LMData(tokenizer=SyntheticTokenizer(task_vocab), train=iter(train), eval_batches=eval_batches)
