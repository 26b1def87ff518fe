"""Grain pipelines for language modelling: documents -> tokens -> packed rows with segment ids and positions.

Each document is tokenized as ``BOS text EOS``; rows of ``seq_len + 1`` tokens are filled by grain's
concat-then-split packer, which also emits per-token segment ids (1, 2, ... per document in the row) and
positions within the document. A batch holds

    inputs [b t], targets [b t], segment_ids [b t], positions [b t], loss_mask [b t]

where the target of a token is its successor in the same document (the mask is off across a document boundary
and on padding). The training iterator is a grain ``DatasetIterator``: its ``get_state()`` goes into every
checkpoint, so a resumed run sees exactly the batches it would have seen.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np

from chimera_jax.data import text as text_lib
from chimera_jax.data import tokenizers


@dataclasses.dataclass
class LMData:
    tokenizer: Any
    train: grain.DatasetIterator          # infinite, checkpointable
    eval_batches: list[dict[str, np.ndarray]]  # fixed validation batches (the same at every eval)


def _shift(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    tokens = packed["tokens"]                # [b t+1]
    seg = packed["tokens_segment_ids"]
    pos = packed["tokens_positions"]
    return dict(inputs=tokens[:, :-1].astype(np.int32), targets=tokens[:, 1:].astype(np.int32),
                segment_ids=seg[:, :-1].astype(np.int32), positions=pos[:, :-1].astype(np.int32),
                loss_mask=((seg[:, :-1] == seg[:, 1:]) & (seg[:, 1:] > 0)).astype(np.float32))


def _packed(docs: grain.MapDataset, tokenizer, seq_len: int) -> grain.IterDataset:
    def tokenize(doc: str) -> dict[str, np.ndarray]:
        ids = tokenizer.encode(doc)
        return {"tokens": np.concatenate([[tokenizer.bos_id], ids, [tokenizer.eos_id]]).astype(np.int32)}

    return grain.experimental.ConcatThenSplitIterDataset(
        docs.map(tokenize).to_iter_dataset(), length_struct={"tokens": seq_len + 1})


def document_sources(data_cfg) -> tuple[list[str], list[str]]:
    """(train documents, validation documents) from the configured source."""
    paths = text_lib.resolve_files(data_cfg.text_files)
    if data_cfg.source == "tfds":
        from chimera_jax.data import tfds_text

        import os
        data_dir = os.path.join(os.path.expanduser(data_cfg.cache_dir), "tfds")
        built = tfds_text.prepare_text_dataset(paths, data_dir, split_documents=data_cfg.document_split,
                                               validation_fraction=data_cfg.validation_fraction)
        train = tfds_text.text_data_source(built, "train")
        val = tfds_text.text_data_source(built, "validation")
        return [train[i] for i in range(len(train))], [val[i] for i in range(len(val))]
    if data_cfg.source != "text":
        raise ValueError(f"data.source must be 'text', 'tfds', 'synthetic', 'mqar' or 'niah', got {data_cfg.source!r}")
    docs = text_lib.read_documents(paths, data_cfg.document_split)
    return text_lib.train_validation_split(docs, data_cfg.validation_fraction)


def build(data_cfg, *, seed: int, vocab_size: int) -> LMData:
    """The training iterator and the fixed validation batches for ``config.data``."""
    if data_cfg.source == "synthetic":
        return _synthetic(data_cfg, seed=seed, vocab_size=vocab_size)
    if data_cfg.source in ("mqar", "niah"):  # synthetic recall tasks (data/synthetic_recall.py)
        from chimera_jax.data import synthetic_recall

        return synthetic_recall.build(data_cfg, seed=seed, vocab_size=vocab_size)
    train_docs, val_docs = document_sources(data_cfg)
    tokenizer = tokenizers.build_tokenizer(data_cfg, train_docs)
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"the {data_cfg.tokenizer} tokenizer has {tokenizer.vocab_size} tokens but "
                         f"model.vocab_size is {vocab_size}")
    b, t = data_cfg.batch_size, data_cfg.seq_len
    train = (_packed(grain.MapDataset.source(train_docs).shuffle(seed=seed).repeat(), tokenizer, t)
             .batch(b, drop_remainder=True).map(_shift))
    val = _packed(grain.MapDataset.source(val_docs), tokenizer, t).batch(b, drop_remainder=False).map(_shift)
    eval_batches = []
    for batch in val:
        if len(eval_batches) == data_cfg.eval_batches:
            break
        if batch["inputs"].shape[0] < b:  # pad the last, short batch with masked rows
            pad = b - batch["inputs"].shape[0]
            batch = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
        eval_batches.append(batch)
    if not eval_batches:
        raise ValueError("the validation split yields no batch; add text or lower data.validation_fraction")
    return LMData(tokenizer=tokenizer, train=iter(train), eval_batches=eval_batches)


def _synthetic(data_cfg, *, seed: int, vocab_size: int) -> LMData:
    """Uniform random tokens, one unpacked document per row: for throughput benchmarks, not for learning."""
    b, t = data_cfg.batch_size, data_cfg.seq_len

    def make(index: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([seed, index])
        tokens = rng.integers(0, vocab_size, (b, t + 1), dtype=np.int32)
        return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=np.ones((b, t), np.int32),
                    positions=np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
                    loss_mask=np.ones((b, t), np.float32))

    train = grain.MapDataset.range(1 << 40).map(make).to_iter_dataset()
    return LMData(tokenizer=tokenizers.ByteTokenizer(), train=iter(train),
                  eval_batches=[make((1 << 41) + i) for i in range(data_cfg.eval_batches)])
