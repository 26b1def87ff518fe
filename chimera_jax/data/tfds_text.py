"""A tfds dataset of text documents from local UTF-8 files, stored as ArrayRecord, read without TensorFlow.

Writing goes through `tfds.core.GeneratorBasedBuilder.download_and_prepare` with `file_format="array_record"`:
the generator path of tfds (no Apache Beam) serializes examples into `tf.train.Example` protos with the proto
classes tfds bundles, so TensorFlow is never imported. Reading goes through `tfds.data_source`, which gives random
access (len + getitem) over the ArrayRecord shards; `text_data_source` wraps it so that each item is the document
as a `str`, ready for `grain.MapDataset.source(...)`.

Layout: one corpus per `data_dir`, at `<data_dir>/chimera_local_text/1.0.0/`. The inputs that define the build
(file contents, document rule, validation fraction) are fingerprinted into the tfds `metadata.json` of that
directory, so a second `prepare_text_dataset` with the same inputs reuses the build and different inputs rebuild.

Split rule (deterministic, by global document index i over the files in the given order, documents in file
order): document i goes to `validation` iff ceil((i + 1) * f) > ceil(i * f), f = validation_fraction. This spreads
the validation documents evenly over the corpus and gives exactly ceil(n * f) of them (so at least one when
f > 0, and document 0 is always one of them). Within each split, documents keep index order.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Iterator

import tensorflow_datasets as tfds

from chimera_jax.data.text import SPLIT_RULES, is_validation, split_into_documents  # noqa: F401 (re-exported)

DATASET_NAME = "chimera_local_text"
DATASET_VERSION = "1.0.0"
# Bump when the meaning of a build changes (split rule, document rule, features) so old builds are not reused.
_FORMAT_REVISION = 1
_METADATA_KEY = "chimera_inputs"


def _read_file(path: str) -> str:
    if not os.path.isfile(path):
        raise ValueError(f"text file {path!r} does not exist (or is not a regular file)")
    with open(path, "rb") as f:
        raw = f.read()
    if not raw:
        raise ValueError(f"text file {path!r} is empty")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"text file {path!r} is not valid UTF-8: {e}") from None


def _iter_documents(files: list[str], split_documents: str) -> Iterator[str]:
    """All documents of the corpus in global index order."""
    for path in files:
        yield from split_into_documents(_read_file(path), split_documents)


def _inputs_record(files: list[str], split_documents: str, validation_fraction: float) -> dict:
    """Checks every file and returns what defines the build, with its fingerprint.

    The fingerprint covers the file contents (sha256) and sizes in order, not their paths: the same texts moved
    elsewhere give the same dataset.
    """
    digest = hashlib.sha256()
    digest.update(json.dumps([_FORMAT_REVISION, split_documents, repr(float(validation_fraction))]).encode())
    num_documents = 0
    for path in files:
        text = _read_file(path)
        documents = split_into_documents(text, split_documents)
        if not documents:
            raise ValueError(f"text file {path!r} holds no documents (only whitespace)")
        num_documents += len(documents)
        raw = text.encode("utf-8")
        digest.update(len(raw).to_bytes(8, "little"))
        digest.update(hashlib.sha256(raw).digest())
    num_validation = sum(is_validation(i, validation_fraction) for i in range(num_documents))
    return dict(
        fingerprint=digest.hexdigest(),
        split_documents=split_documents,
        validation_fraction=float(validation_fraction),
        num_files=len(files),
        num_documents=num_documents,
        num_validation=num_validation,
        num_train=num_documents - num_validation,
    )


class LocalText(tfds.core.GeneratorBasedBuilder):
    """Documents {"text": str} from local UTF-8 files, split into train/validation by document index.

    The inputs come in through the constructor; a builder made without them (as `tfds.data_source` makes it)
    can only read an existing build.
    """

    name = DATASET_NAME
    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES = {DATASET_VERSION: "Text documents from local files."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # No source-side resources (checksums, metadata files) belong to a builder configured at run time. Also,
        # the inherited lookup needs the `importlib_resources` backport for a builder defined inside a package.
        return None

    def __init__(self, *, files=(), split_documents="blank_lines", validation_fraction=0.1, inputs=None, **kwargs):
        # Set before super().__init__, which builds `info` (and so calls `_info`).
        self._files = list(files)
        self._split_documents = split_documents
        self._validation_fraction = validation_fraction
        self._inputs = inputs
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo directly rather than dataset_info_from_configs: the latter reads metadata files placed
        # beside a dataset's own module, which a builder configured at run time does not have.
        metadata = tfds.core.MetadataDict()
        if self._inputs is not None:
            metadata[_METADATA_KEY] = self._inputs
        return tfds.core.DatasetInfo(
            builder=self,
            description="Text documents from local UTF-8 files.",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
            metadata=metadata,
            # Keep index order inside each split (keys are the global document indices).
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        if not self._files or self._inputs is None:
            raise ValueError(f"{DATASET_NAME}: no build in {self.data_dir!r}; create it with prepare_text_dataset")
        splits = {"train": self._generate_examples(want_validation=False)}
        if self._inputs["num_validation"]:
            splits["validation"] = self._generate_examples(want_validation=True)
        return splits

    def _generate_examples(self, want_validation: bool):
        for index, document in enumerate(_iter_documents(self._files, self._split_documents)):
            if is_validation(index, self._validation_fraction) == want_validation:
                yield index, {"text": document}


def _version_dir(data_dir: str) -> str:
    return os.path.join(data_dir, DATASET_NAME, DATASET_VERSION)


def _stored_inputs(data_dir: str) -> dict | None:
    """The inputs record of a complete build in data_dir, or None when there is none."""
    version_dir = _version_dir(data_dir)
    # dataset_info.json is written last into a temporary directory that tfds renames into place, so its
    # presence means a complete build.
    if not os.path.isfile(os.path.join(version_dir, "dataset_info.json")):
        return None
    try:
        with open(os.path.join(version_dir, "metadata.json")) as f:
            return json.load(f).get(_METADATA_KEY)
    except (OSError, ValueError):
        return None


def prepare_text_dataset(
    files: list[str],
    data_dir: str,
    *,
    split_documents: str = "blank_lines",
    validation_fraction: float = 0.1,
) -> str:
    """Builds the ArrayRecord dataset of `files` into `data_dir` (once) and returns `data_dir`.

    Args:
        files: UTF-8 text files, read in this order (the order defines document indices and so the split).
        data_dir: tfds data directory holding this one corpus.
        split_documents: "blank_lines" (paragraphs separated by blank lines) or "whole_file".
        validation_fraction: in [0, 1); the share of documents in `validation` (0 writes only `train`).

    An existing build whose fingerprint matches the inputs is reused untouched; one that does not match is
    replaced. Raises ValueError naming the file for a missing, empty, whitespace-only or non-UTF-8 file.
    """
    if isinstance(files, (str, bytes, os.PathLike)):
        raise ValueError(f"files must be a list of paths, got the single path {files!r}")
    files = [os.fspath(p) for p in files]
    if not files:
        raise ValueError("files is empty: give at least one text file")
    if split_documents not in SPLIT_RULES:
        raise ValueError(f"split_documents must be one of {SPLIT_RULES}, got {split_documents!r}")
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction!r}")
    data_dir = os.fspath(data_dir)

    inputs = _inputs_record(files, split_documents, validation_fraction)
    if inputs["num_train"] == 0:
        raise ValueError(
            f"train split would be empty: {inputs['num_documents']} documents with "
            f"validation_fraction={validation_fraction}"
        )
    stored = _stored_inputs(data_dir)
    if stored is not None and stored.get("fingerprint") == inputs["fingerprint"]:
        return data_dir

    builder = LocalText(
        files=files,
        split_documents=split_documents,
        validation_fraction=validation_fraction,
        inputs=inputs,
        data_dir=data_dir,
        file_format="array_record",
    )
    # REUSE_CACHE_IF_EXISTS regenerates the dataset: a build of other inputs (or an unfinished one) left in
    # data_dir is deleted and replaced rather than reused.
    builder.download_and_prepare(
        download_dir=os.path.join(data_dir, "downloads"),
        download_config=tfds.download.DownloadConfig(
            download_mode=tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS
        ),
    )
    return data_dir


class TextSource:
    """Random access to the documents of one split as `str`: len() and [index], for grain.MapDataset.source."""

    def __init__(self, data_dir: str, split: str):
        self.data_dir = data_dir
        self.split = split
        # download=False: reading must never try to build (the builder made here has no inputs).
        self._source = tfds.data_source(
            DATASET_NAME, split=split, data_dir=data_dir, download=False,
            builder_kwargs=dict(file_format="array_record"),
        )

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> str:
        return self._source[index]["text"].decode("utf-8")

    def __repr__(self) -> str:
        return f"TextSource(data_dir={self.data_dir!r}, split={self.split!r}, len={len(self)})"


def text_data_source(data_dir: str, split: str) -> TextSource:
    """The documents of `split` ("train", "validation", or a tfds slice like "train[:10%]") of a prepared build."""
    if _stored_inputs(data_dir) is None:
        raise ValueError(f"no {DATASET_NAME} build in {data_dir!r}: run prepare_text_dataset first")
    return TextSource(data_dir, split)
