"""Grain pipelines of the concept pipeline.

Stage 1 (``ConceptData``): examples of MNIST digits, tinyshakespeare lines, or both, as the fixed-shape numpy
arrays the concept model reads (see models/concept.py):
    image [b S S] uint8 (the 28x28 digit centred in S x S), image_mask [b S S] (1 on the digit's 28x28 pixels),
    has_image [b]; text [b T] int32 UTF-8 bytes, then 0 (end) then 0 padding, text_mask [b T] (1 on the line's
    bytes and its terminating 0), has_text [b].
In ``both`` example i pairs digit i with line i (mod the line count); with probability ``missing_prob`` each, one
of the two is dropped (has_* = 0), so the model learns with missing modalities.

Stage 2 (``PlannerData``): concept-index sequences (one per stage-1 example) stored as ArrayRecord, read with
grain, each as ``BOS c_1 .. c_n`` packed into rows like the LM pipeline:
    inputs, targets, segment_ids, positions [b t] int32, loss_mask [b t] float.
Train iterators are grain DatasetIterators, checkpointed with the train state.
"""
from __future__ import annotations

import dataclasses
import os

import grain
import numpy as np

from chimera_jax.data import mnist
from chimera_jax.data import text as text_lib

KINDS = ("mnist", "text", "both")


@dataclasses.dataclass
class ConceptData:
    train: grain.DatasetIterator
    eval_batches: list[dict[str, np.ndarray]]
    num_train: int
    num_eval: int
    source: "ExampleSource"


class ExampleSource:
    """Random access to every example (train and validation) of one data kind, by integer id."""

    def __init__(self, data_cfg, seed: int):
        if data_cfg.kind not in KINDS:
            raise ValueError(f"data.kind must be one of {KINDS}, got {data_cfg.kind!r}")
        self.cfg, self.seed = data_cfg, seed
        self.images = mnist.load()[0] if data_cfg.kind in ("mnist", "both") else None
        self.lines = None
        if data_cfg.kind in ("text", "both"):
            paths = text_lib.resolve_files(data_cfg.text_files)
            lines = []
            for p in paths:
                with open(p, encoding="utf-8") as f:
                    lines += [ln.strip() for ln in f if ln.strip()]
            if not lines:
                raise ValueError(f"data.text_files={data_cfg.text_files!r} hold no non-blank line")
            self.lines = lines
        self.size = len(self.images) if self.images is not None else len(self.lines)
        if data_cfg.max_examples:
            self.size = min(self.size, data_cfg.max_examples)
        ids = np.arange(self.size)
        val = np.array([text_lib.is_validation(i, data_cfg.validation_fraction) for i in ids], bool)
        self.train_ids, self.eval_ids = ids[~val], ids[val]

    def image(self, i: int) -> dict[str, np.ndarray]:
        s = self.cfg.image_size
        pad = (s - 28) // 2
        if s < 28 or (s - 28) % 2:
            raise ValueError(f"data.image_size={s} must be >= 28 and 28 + an even number")
        img = np.zeros((s, s), np.uint8)
        img[pad:pad + 28, pad:pad + 28] = self.images[i % len(self.images)]
        mask = np.zeros((s, s), np.float32)
        mask[pad:pad + 28, pad:pad + 28] = 1.0
        return dict(image=img, image_mask=mask, has_image=np.float32(1.0))

    def text(self, i: int) -> dict[str, np.ndarray]:
        t = self.cfg.text_len
        raw = self.lines[i % len(self.lines)].encode("utf-8")[:t - 1]
        out = np.zeros((t,), np.int32)
        out[:len(raw)] = np.frombuffer(raw, np.uint8)
        mask = np.zeros((t,), np.float32)
        mask[:len(raw) + 1] = 1.0
        return dict(text=out, text_mask=mask, has_text=np.float32(1.0))

    def __call__(self, i: int) -> dict[str, np.ndarray]:
        i = int(i)
        kind = self.cfg.kind
        if kind == "mnist":
            return self.image(i)
        if kind == "text":
            return self.text(i)
        ex = {**self.image(i), **self.text(i)}
        u = np.random.default_rng([self.seed, 7, i]).random()
        p = self.cfg.missing_prob
        if u < p:
            ex["has_image"] = np.float32(0.0)
        elif u < 2 * p:
            ex["has_text"] = np.float32(0.0)
        return ex

    def empty(self) -> dict[str, np.ndarray]:
        """An example with every modality absent (pads the last eval batch)."""
        ex = self(0)
        return {k: (np.zeros_like(v) if k.startswith("has_") or k.endswith("_mask") else v) for k, v in ex.items()}


def _stack(examples):
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def batches_of(source: ExampleSource, ids, batch_size: int, limit: int | None = None) -> list[dict]:
    """Fixed batches over ``ids`` in order, the last one padded with empty examples."""
    out = []
    for start in range(0, len(ids), batch_size):
        if limit is not None and len(out) == limit:
            break
        exs = [source(i) for i in ids[start:start + batch_size]]
        exs += [source.empty()] * (batch_size - len(exs))
        out.append(_stack(exs))
    return out


def build(data_cfg, *, seed: int) -> ConceptData:
    """The stage-1 training iterator and fixed validation batches for ``config.data``."""
    source = ExampleSource(data_cfg, seed)
    if len(source.eval_ids) == 0:
        raise ValueError("the validation split is empty; raise data.validation_fraction or data.max_examples")
    train = (grain.MapDataset.source(source.train_ids).shuffle(seed=seed).repeat().map(source)
             .batch(data_cfg.batch_size, drop_remainder=True).to_iter_dataset())
    eval_batches = batches_of(source, source.eval_ids, data_cfg.batch_size, data_cfg.eval_batches)
    return ConceptData(train=iter(train), eval_batches=eval_batches, num_train=len(source.train_ids),
                       num_eval=len(source.eval_ids), source=source)


# ------------------------------------------------------------------------------------- stage 2: ArrayRecord

def write_sequences(path: str, sequences) -> None:
    """Writes int32 sequences (one record each, little-endian) to an ArrayRecord file, atomically."""
    from array_record.python.array_record_module import ArrayRecordWriter

    tmp = path + ".tmp"
    writer = ArrayRecordWriter(tmp, "group_size:1")
    for seq in sequences:
        writer.write(np.asarray(seq, "<i4").tobytes())
    writer.close()
    os.replace(tmp, path)


def _decode(record: bytes) -> np.ndarray:
    return np.frombuffer(record, "<i4").astype(np.int32)


def read_sequences(path: str) -> grain.MapDataset:
    """An ArrayRecord file of write_sequences -> a grain MapDataset of int32 arrays."""
    return grain.MapDataset.source(grain.sources.ArrayRecordDataSource([path])).map(_decode)


class JsonStateIterator:
    """A grain iterator whose state survives a JSON round trip.

    Checkpoints store the data state as JSON, which turns tuples into lists; grain's concat-then-split packer keeps
    ``remainder_slices`` as tuples and resumes wrongly from lists, so they are turned back here.
    """

    def __init__(self, it):
        self._it = it

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._it)

    def get_state(self):
        return self._it.get_state()

    def set_state(self, state):
        self._it.set_state(_tuples(state))


def _tuples(state):
    if not isinstance(state, dict):
        return state
    out = {}
    for k, v in state.items():
        if k == "remainder_slices" and isinstance(v, dict):
            out[k] = {kk: tuple(vv) if isinstance(vv, list) else vv for kk, vv in v.items()}
        else:
            out[k] = _tuples(v)
    return out


@dataclasses.dataclass
class PlannerData:
    train: JsonStateIterator
    eval_batches: list[dict[str, np.ndarray]]


def _shift(packed):
    tokens, seg, pos = packed["tokens"], packed["tokens_segment_ids"], packed["tokens_positions"]
    return dict(inputs=tokens[:, :-1].astype(np.int32), targets=tokens[:, 1:].astype(np.int32),
                segment_ids=seg[:, :-1].astype(np.int32), positions=pos[:, :-1].astype(np.int32),
                loss_mask=((seg[:, :-1] == seg[:, 1:]) & (seg[:, 1:] > 0)).astype(np.float32))


def _packed(seqs: grain.MapDataset, bos: int, seq_len: int) -> grain.IterDataset:
    def add_bos(seq):
        return {"tokens": np.concatenate([[bos], seq]).astype(np.int32)}

    return grain.experimental.ConcatThenSplitIterDataset(seqs.map(add_bos).to_iter_dataset(),
                                                         length_struct={"tokens": seq_len + 1})


def build_planner(train_path: str, eval_path: str, *, bos: int, seq_len: int, batch_size: int, seed: int,
                  eval_batches: int) -> PlannerData:
    train = (_packed(read_sequences(train_path).shuffle(seed=seed).repeat(), bos, seq_len)
             .batch(batch_size, drop_remainder=True).map(_shift))
    val = _packed(read_sequences(eval_path), bos, seq_len).batch(batch_size, drop_remainder=False).map(_shift)
    out = []
    for batch in val:
        if len(out) == eval_batches:
            break
        pad = batch_size - batch["inputs"].shape[0]
        if pad:
            batch = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
        out.append(batch)
    if not out:
        raise ValueError(f"{eval_path} yields no validation batch")
    return PlannerData(train=JsonStateIterator(iter(train)), eval_batches=out)
