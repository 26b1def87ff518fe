import numpy as np
import pytest

from chimera_jax.data import lm_pipeline, text as text_lib, tokenizers
from tests.lm_testing import micro_config


def _corpus(tmp_path, n_docs=40):
    rng = np.random.default_rng(0)
    docs = ["".join(rng.choice(list("abcdefgh "), size=rng.integers(5, 60))) for _ in range(n_docs)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(docs) + "\n")
    return str(path), docs


def test_packing_rows_hold_whole_documents_with_boundaries(tmp_path):
    path, docs = _corpus(tmp_path)
    c = micro_config(**{"data.text_files": path})
    data = lm_pipeline.build(c.data, seed=0, vocab_size=c.model.vocab_size)
    tok = data.tokenizer
    batch = next(data.train)
    for row in range(batch["inputs"].shape[0]):
        seg, pos, mask = batch["segment_ids"][row], batch["positions"][row], batch["loss_mask"][row]
        inp, tgt = batch["inputs"][row], batch["targets"][row]
        for s in np.unique(seg[seg > 0]):
            idx = np.where(seg == s)[0]
            assert np.all(np.diff(idx) == 1)                  # a document is contiguous in the row
            assert np.all(np.diff(pos[idx]) == 1)             # positions count up inside it
        # BOS only ever opens a segment.
        bos_at = np.where(inp == tok.bos_id)[0]
        assert np.all(pos[bos_at] == 0)
        # A target is predicted only from the same document: never across a boundary, never on padding.
        on = mask[:-1] > 0
        assert np.all(seg[:-1][on] == seg[1:][on]) and np.all(seg[mask > 0] > 0)
        np.testing.assert_array_equal(inp[1:][on], tgt[:-1][on])
        assert mask.sum() > 0


def test_loss_mask_is_off_exactly_at_document_ends():
    packed = {"tokens": np.array([[1, 2, 3, 4, 5, 6]]), "tokens_segment_ids": np.array([[1, 1, 1, 2, 2, 0]]),
              "tokens_positions": np.array([[0, 1, 2, 0, 1, 0]])}
    b = lm_pipeline._shift(packed)
    np.testing.assert_array_equal(b["loss_mask"][0], [1, 1, 0, 1, 0])
    np.testing.assert_array_equal(b["targets"][0], [2, 3, 4, 5, 6])


def test_iterator_state_round_trip_gives_the_same_batches(tmp_path):
    path, _ = _corpus(tmp_path)
    c = micro_config(**{"data.text_files": path})
    a = lm_pipeline.build(c.data, seed=3, vocab_size=c.model.vocab_size)
    for _ in range(5):
        next(a.train)
    state = a.train.get_state()
    expected = [next(a.train) for _ in range(4)]
    b = lm_pipeline.build(c.data, seed=3, vocab_size=c.model.vocab_size)
    b.train.set_state(state)
    for want in expected:
        got = next(b.train)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def test_split_is_deterministic_and_disjoint(tmp_path):
    _, docs = _corpus(tmp_path)
    docs = [f"{i}:{d}" for i, d in enumerate(docs)]
    train, val = text_lib.train_validation_split(docs, 0.1)
    assert set(train).isdisjoint(val) and len(train) + len(val) == len(docs) and len(val) == 4
    assert text_lib.train_validation_split(docs, 0.1) == (train, val)


def test_missing_file_and_empty_corpus_are_named(tmp_path):
    c = micro_config(**{"data.text_files": str(tmp_path / "nope.txt")})
    with pytest.raises(FileNotFoundError, match=r"data.text_files.*nope.txt"):
        lm_pipeline.build(c.data, seed=0, vocab_size=c.model.vocab_size)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    c = micro_config(**{"data.text_files": str(empty)})
    with pytest.raises(ValueError, match=r"empty.txt is empty"):
        lm_pipeline.build(c.data, seed=0, vocab_size=c.model.vocab_size)


def test_sentencepiece_is_trained_once_and_counts_bytes(tmp_path):
    docs = text_lib.read_documents([text_lib.bundled_path("tinyshakespeare")])[:400]
    path = tokenizers.train_sentencepiece(docs, 512, str(tmp_path))
    mtime = (tmp_path / path.split("/")[-1]).stat().st_mtime_ns
    assert tokenizers.train_sentencepiece(docs, 512, str(tmp_path)) == path  # cached
    assert (tmp_path / path.split("/")[-1]).stat().st_mtime_ns == mtime
    tok = tokenizers.SentencePieceTokenizer(path)
    text = "ROMEO: what light through yonder window breaks? \u00e9"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    # bits per byte needs the byte count of the text from the token table (leading space of pieces included)
    assert tok.token_bytes[ids].sum() in (len(text.encode()), len(text.encode()) + 1)


def test_byte_tokenizer_round_trip():
    tok = tokenizers.ByteTokenizer()
    s = "héllo\nworld"
    assert tok.decode(tok.encode(s)) == s and tok.token_bytes[tok.encode(s)].sum() == len(s.encode())


def test_tfds_source_gives_the_same_documents_as_text(tmp_path):
    path, _ = _corpus(tmp_path)
    c = micro_config(**{"data.text_files": path, "data.cache_dir": str(tmp_path / "cache")})
    text_train, text_val = lm_pipeline.document_sources(c.data)
    c.data.source = "tfds"
    tfds_train, tfds_val = lm_pipeline.document_sources(c.data)
    assert tfds_train == text_train and tfds_val == text_val
    data = lm_pipeline.build(c.data, seed=0, vocab_size=c.model.vocab_size)
    assert next(data.train)["inputs"].shape == (c.data.batch_size, c.data.seq_len)
