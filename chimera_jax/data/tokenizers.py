"""Tokenizers: raw bytes (256 + specials) and SentencePiece trained offline from the corpus and cached.

Both expose ``encode(str) -> int32 array``, ``decode(ids) -> str``, ``vocab_size``, ``pad_id/bos_id/eos_id`` and
``token_bytes``: the UTF-8 byte count of every token (0 for specials), which turns nats per token into bits per
byte, the tokenizer-independent metric every eval reports.
"""
from __future__ import annotations

import hashlib
import os

import numpy as np


class ByteTokenizer:
    """Ids 0..255 are the bytes themselves; then PAD, BOS, EOS."""

    pad_id, bos_id, eos_id = 256, 257, 258
    vocab_size = 259

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        ids = np.asarray(ids).reshape(-1)
        return bytes(int(i) for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def decode_bytes(self, ids) -> bytes:
        """Raw bytes of the non-special ids (for incremental UTF-8 decoding while streaming)."""
        return bytes(int(i) for i in np.asarray(ids).reshape(-1) if 0 <= i < 256)

    @property
    def token_bytes(self) -> np.ndarray:
        out = np.zeros(self.vocab_size, np.int32)
        out[:256] = 1
        return out


class SentencePieceTokenizer:
    def __init__(self, model_path: str):
        import sentencepiece as spm

        self.model_path = model_path
        self.sp = spm.SentencePieceProcessor(model_file=model_path)
        self.pad_id, self.bos_id, self.eos_id = self.sp.pad_id(), self.sp.bos_id(), self.sp.eos_id()
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.sp.encode(text), np.int32)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in np.asarray(ids).reshape(-1)])

    def decode_bytes(self, ids) -> bytes:
        return self.decode(ids).encode("utf-8")

    @property
    def token_bytes(self) -> np.ndarray:
        out = np.zeros(self.vocab_size, np.int32)
        for i in range(self.vocab_size):
            if self.sp.is_control(i) or self.sp.is_unknown(i):
                continue
            piece = self.sp.id_to_piece(i)
            out[i] = 1 if self.sp.is_byte(i) else len(piece.replace("\u2581", " ").encode("utf-8"))
        return out


def train_sentencepiece(documents: list[str], vocab_size: int, cache_dir: str) -> str:
    """Trains (once) a BPE SentencePiece model on the documents; returns the cached model path.

    The cache key hashes the documents and the settings, so a changed corpus gets a new model and a rerun reuses
    the old one. Byte fallback keeps every input encodable. Written to a temporary name, then renamed.
    """
    import sentencepiece as spm

    digest = hashlib.sha256()
    digest.update(f"bpe|{vocab_size}|byte_fallback".encode())
    for d in documents:
        digest.update(d.encode("utf-8"))
    cache_dir = os.path.expanduser(cache_dir)
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, f"spm-{vocab_size}-{digest.hexdigest()[:16]}.model")
    if os.path.exists(path):
        return path
    tmp_prefix = path[: -len(".model")] + f".tmp{os.getpid()}"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(documents), model_prefix=tmp_prefix, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, pad_id=0, unk_id=1, bos_id=2, eos_id=3, character_coverage=1.0,
        max_sentence_length=1 << 20, split_by_whitespace=True, minloglevel=2, num_threads=os.cpu_count() or 1)
    os.replace(tmp_prefix + ".model", path)
    os.remove(tmp_prefix + ".vocab")
    return path


def build_tokenizer(data_cfg, train_documents: list[str]):
    if data_cfg.tokenizer == "bytes":
        return ByteTokenizer()
    if data_cfg.tokenizer == "sentencepiece":
        return SentencePieceTokenizer(
            train_sentencepiece(train_documents, data_cfg.sentencepiece_vocab_size, data_cfg.cache_dir))
    raise ValueError(f"data.tokenizer must be 'bytes' or 'sentencepiece', got {data_cfg.tokenizer!r}")
