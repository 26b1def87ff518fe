"""The MNIST test digits (10,000 images, LeCun et al., 1998) bundled in chimera_jax/data/corpora, read from IDX.

IDX: a big-endian header (magic 0x0000080N with N the number of dimensions, then one uint32 per dimension) followed
by the raw uint8 array.
"""
from __future__ import annotations

import functools
import gzip
import struct
from importlib import resources

import numpy as np

IMAGES = "mnist-t10k-images-idx3-ubyte.gz"
LABELS = "mnist-t10k-labels-idx1-ubyte.gz"


def parse_idx(data: bytes) -> np.ndarray:
    """An uncompressed IDX file's bytes -> uint8 array of the shape its header gives."""
    if len(data) < 4:
        raise ValueError("IDX data too short for a header")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"not an unsigned-byte IDX file (magic {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"IDX header says {shape} but holds {body.size} bytes")
    return body.reshape(shape)


def _read(name: str) -> np.ndarray:
    path = resources.files("chimera_jax.data") / "corpora" / name
    if not path.is_file():
        raise FileNotFoundError(f"the bundled MNIST file {name} is missing from chimera_jax/data/corpora")
    with path.open("rb") as f:
        return parse_idx(gzip.decompress(f.read()))


@functools.lru_cache(maxsize=1)
def load() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [10000 28 28], labels uint8 [10000]) of the MNIST test set."""
    images, labels = _read(IMAGES), _read(LABELS)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"MNIST: {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels
