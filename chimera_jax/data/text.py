"""Local text corpora: resolving the files a config names, splitting them into documents, train/validation split."""
from __future__ import annotations

import math
import os
from importlib import resources

BUNDLED_PREFIX = "bundled:"
SPLIT_RULES = ("whole_file", "blank_lines")


def split_into_documents(text: str, split_documents: str) -> list[str]:
    """Cuts one file's text into documents.

    "whole_file": the file is one document (text unchanged). "blank_lines": runs of non-blank lines are
    documents, joined with "\\n"; lines holding only whitespace separate them and are dropped.
    Documents that are only whitespace are dropped in both rules.
    """
    if split_documents == "whole_file":
        return [text] if text.strip() else []
    if split_documents == "blank_lines":
        documents, current = [], []
        for line in text.splitlines():
            if line.strip():
                current.append(line)
            elif current:
                documents.append("\n".join(current))
                current = []
        if current:
            documents.append("\n".join(current))
        return documents
    raise ValueError(f"split_documents must be one of {SPLIT_RULES}, got {split_documents!r}")


def is_validation(index: int, validation_fraction: float) -> bool:
    """Document ``index`` (0-based, over all files in order) is validation iff ceil((i+1) f) > ceil(i f):
    exactly ceil(n f) validation documents spread evenly through the corpus, and a document keeps its split
    whatever the corpus length. The tfds builder uses the same rule."""
    return math.ceil((index + 1) * validation_fraction) > math.ceil(index * validation_fraction)


def bundled_path(name: str) -> str:
    """Path of a corpus shipped inside the package (chimera_jax/data/corpora/NAME[.txt])."""
    root = resources.files("chimera_jax.data") / "corpora"
    for candidate in (name, name + ".txt"):
        path = root / candidate
        if path.is_file():
            return str(path)
    available = sorted(p.name for p in root.iterdir())
    raise FileNotFoundError(f"no bundled corpus {name!r}; bundled files: {available}")


def resolve_files(spec: str, field: str = "data.text_files") -> list[str]:
    """'a.txt,bundled:tinyshakespeare' -> absolute paths, each checked to exist."""
    paths = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        path = bundled_path(item[len(BUNDLED_PREFIX):]) if item.startswith(BUNDLED_PREFIX) else \
            os.path.abspath(os.path.expanduser(item))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{field}: file {item!r} not found (looked at {path})")
        paths.append(path)
    if not paths:
        raise ValueError(f"{field} names no files")
    return paths


def read_documents(paths: list[str], split: str = "blank_lines") -> list[str]:
    """Documents of the corpus in file order: each file whole, or its blank-line separated paragraphs."""
    if split not in SPLIT_RULES:
        raise ValueError(f"data.document_split must be one of {SPLIT_RULES}, got {split!r}")
    docs: list[str] = []
    for path in paths:
        with open(path, encoding="utf-8", errors="strict") as f:
            try:
                text = f.read()
            except UnicodeDecodeError as e:
                raise ValueError(f"{path} is not UTF-8 text: {e}") from None
        if not text.strip():
            raise ValueError(f"corpus file {path} is empty")
        docs.extend(split_into_documents(text, split))
    return docs


def train_validation_split(docs: list[str], validation_fraction: float) -> tuple[list[str], list[str]]:
    """Deterministic split by document index (``is_validation``): the same rule as the tfds builder."""
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"data.validation_fraction must be in (0, 1), got {validation_fraction}")
    if len(docs) < 2:
        raise ValueError(f"the corpus has {len(docs)} document(s); a train/validation split needs at least 2")
    train = [d for i, d in enumerate(docs) if not is_validation(i, validation_fraction)]
    val = [d for i, d in enumerate(docs) if is_validation(i, validation_fraction)]
    return train, val
