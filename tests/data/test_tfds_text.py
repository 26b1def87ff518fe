"""Local text files -> tfds ArrayRecord build -> tfds.data_source -> grain, with no TensorFlow."""
import collections
import math
import os
import re
import sys

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds

from chimera_jax.data import tfds_text

FILE_A = "alpha one\nalpha two\n\n\nbeta é ü\n   \n\ngamma\n"  # 3 documents; a whitespace-only line separates
FILE_B = "delta\r\n\r\nepsilon\n\nzeta\n\neta\n\ntheta\n\niota\n\nkappa"  # 7 documents; CRLF and no final newline
DOCS_A = ["alpha one\nalpha two", "beta é ü", "gamma"]
DOCS_B = ["delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]


def _write(path, text):
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    return str(path)


@pytest.fixture
def corpus(tmp_path):
    return [_write(tmp_path / "a.txt", FILE_A), _write(tmp_path / "b.txt", FILE_B)]


def _read_all(source):
    return [source[i] for i in range(len(source))]


def _build_files(data_dir):
    """(path, mtime_ns, inode) of every file of the build: equal before and after means nothing was rewritten."""
    version_dir = os.path.join(data_dir, tfds_text.DATASET_NAME, tfds_text.DATASET_VERSION)
    out = []
    for name in sorted(os.listdir(version_dir)):
        st = os.stat(os.path.join(version_dir, name))
        out.append((name, st.st_mtime_ns, st.st_ino))
    return out


def test_split_into_documents_rules():
    assert tfds_text.split_into_documents(FILE_A, "blank_lines") == DOCS_A
    assert tfds_text.split_into_documents(FILE_B, "blank_lines") == DOCS_B
    assert tfds_text.split_into_documents(FILE_A, "whole_file") == [FILE_A]
    assert tfds_text.split_into_documents(" \n\t\n", "whole_file") == []
    assert tfds_text.split_into_documents("\n\n  \n", "blank_lines") == []
    with pytest.raises(ValueError, match="split_documents"):
        tfds_text.split_into_documents(FILE_A, "by_sentence")


@pytest.mark.parametrize("fraction", [0.0, 0.05, 0.1, 0.25, 1 / 3, 0.5, 0.9])
def test_validation_rule_takes_ceil_of_every_prefix(fraction):
    # Every prefix of n documents holds exactly ceil(n * f) validation documents: the split is even along the
    # corpus, and ceil(n * f) in total.
    flags = [tfds_text.is_validation(i, fraction) for i in range(200)]
    for n in range(201):
        assert sum(flags[:n]) == math.ceil(n * fraction), (n, fraction)


def test_build_read_back_every_document_once(tmp_path, corpus):
    data_dir = tfds_text.prepare_text_dataset(corpus, str(tmp_path / "data"), validation_fraction=0.25)
    assert data_dir == str(tmp_path / "data")
    shards = os.listdir(os.path.join(data_dir, tfds_text.DATASET_NAME, tfds_text.DATASET_VERSION))
    assert any(".array_record-" in name for name in shards), shards

    train = _read_all(tfds_text.text_data_source(data_dir, "train"))
    validation = _read_all(tfds_text.text_data_source(data_dir, "validation"))
    all_docs = DOCS_A + DOCS_B
    assert collections.Counter(train + validation) == collections.Counter(all_docs)
    assert all(isinstance(d, str) for d in train + validation)
    # ceil(10 * 0.25) = 3 validation documents, at the indices the rule names, in index order in each split.
    expected_validation = [d for i, d in enumerate(all_docs) if tfds_text.is_validation(i, 0.25)]
    assert len(expected_validation) == 3
    assert validation == expected_validation
    assert train == [d for i, d in enumerate(all_docs) if not tfds_text.is_validation(i, 0.25)]

    # The build is an ordinary tfds dataset: the plain reading API returns the same documents as UTF-8 bytes.
    raw = tfds.data_source(tfds_text.DATASET_NAME, split="train", data_dir=data_dir, download=False)
    assert [raw[i]["text"] for i in range(len(raw))] == [d.encode("utf-8") for d in train]
    assert "tensorflow" not in sys.modules


def test_split_is_deterministic_across_builds(tmp_path, corpus):
    dir_1 = tfds_text.prepare_text_dataset(corpus, str(tmp_path / "one"), validation_fraction=0.3)
    dir_2 = tfds_text.prepare_text_dataset(corpus, str(tmp_path / "two"), validation_fraction=0.3)
    for split in ("train", "validation"):
        docs_1 = _read_all(tfds_text.text_data_source(dir_1, split))
        assert docs_1 == _read_all(tfds_text.text_data_source(dir_2, split))
        assert docs_1 == _read_all(tfds_text.text_data_source(dir_1, split))


def test_whole_file_rule_and_no_validation(tmp_path, corpus):
    data_dir = tfds_text.prepare_text_dataset(
        corpus, str(tmp_path / "data"), split_documents="whole_file", validation_fraction=0.0
    )
    assert _read_all(tfds_text.text_data_source(data_dir, "train")) == [FILE_A, FILE_B]
    with pytest.raises(ValueError, match="validation"):
        tfds_text.text_data_source(data_dir, "validation")


def test_grain_map_dataset_iterates(tmp_path, corpus):
    data_dir = tfds_text.prepare_text_dataset(corpus, str(tmp_path / "data"), validation_fraction=0.2)
    source = tfds_text.text_data_source(data_dir, "train")
    ds = grain.MapDataset.source(source)
    assert len(ds) == len(source) == 8
    assert ds[3] == source[3]
    shuffled = list(ds.shuffle(seed=7).map(lambda d: (d, len(d))))
    assert sorted(d for d, _ in shuffled) == sorted(_read_all(source))
    assert all(n == len(d) for d, n in shuffled)
    assert shuffled == list(ds.shuffle(seed=7).map(lambda d: (d, len(d))))  # same seed, same order
    batches = list(ds.batch(3))
    assert [len(b) for b in batches] == [3, 3, 2]
    assert list(np.concatenate(batches)) == _read_all(source)


def test_missing_and_empty_files_are_named(tmp_path, corpus):
    data_dir = str(tmp_path / "data")
    missing = str(tmp_path / "missing.txt")
    empty = _write(tmp_path / "empty.txt", "")
    blank = _write(tmp_path / "blank.txt", "\n \n\t\n")
    bad_utf8 = str(tmp_path / "latin1.txt")
    with open(bad_utf8, "wb") as f:
        f.write("café".encode("latin-1"))
    for path, why in [(missing, "does not exist"), (empty, "is empty"), (blank, "no documents"),
                      (bad_utf8, "not valid UTF-8")]:
        with pytest.raises(ValueError, match=re.escape(repr(path)) + ".*" + why):
            tfds_text.prepare_text_dataset([corpus[0], path], data_dir)
    assert not os.path.exists(os.path.join(data_dir, tfds_text.DATASET_NAME))


def test_bad_arguments(tmp_path, corpus):
    data_dir = str(tmp_path / "data")
    with pytest.raises(ValueError, match="split_documents"):
        tfds_text.prepare_text_dataset(corpus, data_dir, split_documents="lines")
    with pytest.raises(ValueError, match="validation_fraction"):
        tfds_text.prepare_text_dataset(corpus, data_dir, validation_fraction=1.0)
    with pytest.raises(ValueError, match="list of paths"):
        tfds_text.prepare_text_dataset(corpus[0], data_dir)
    with pytest.raises(ValueError, match="files is empty"):
        tfds_text.prepare_text_dataset([], data_dir)
    with pytest.raises(ValueError, match="train split would be empty"):
        # 1 document, f = 0.5 -> ceil(0.5) = 1 validation document, none left for train.
        tfds_text.prepare_text_dataset([_write(tmp_path / "one.txt", "solo\n")], data_dir, validation_fraction=0.5)
    with pytest.raises(ValueError, match="prepare_text_dataset first"):
        tfds_text.text_data_source(data_dir, "train")


def test_second_prepare_reuses_build_and_changed_inputs_rebuild(tmp_path, corpus, monkeypatch):
    data_dir = tfds_text.prepare_text_dataset(corpus, str(tmp_path / "data"))
    before = _build_files(data_dir)

    def no_generation(self, want_validation):
        raise AssertionError("the build was regenerated although its inputs did not change")

    with monkeypatch.context() as m:
        m.setattr(tfds_text.LocalText, "_generate_examples", no_generation)
        # Same contents under other paths fingerprint the same: the build is reused as well.
        moved = [_write(tmp_path / "a_copy.txt", FILE_A), _write(tmp_path / "b_copy.txt", FILE_B)]
        assert tfds_text.prepare_text_dataset(corpus, data_dir) == data_dir
        assert tfds_text.prepare_text_dataset(moved, data_dir) == data_dir
    assert _build_files(data_dir) == before

    # Changed contents (same size) and a changed fraction each replace the build.
    _write(corpus[1], FILE_B.replace("kappa", "KAPPA"))
    tfds_text.prepare_text_dataset(corpus, data_dir)
    docs = _read_all(tfds_text.text_data_source(data_dir, "train"))
    docs += _read_all(tfds_text.text_data_source(data_dir, "validation"))
    assert "KAPPA" in docs and "kappa" not in docs
    tfds_text.prepare_text_dataset(corpus, data_dir, validation_fraction=0.5)
    assert len(tfds_text.text_data_source(data_dir, "validation")) == 5
