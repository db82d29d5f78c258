"""The 5,000 MNIST digits embedded in the package (see PROVENANCE.md for their origin).

Embedding them lets MultiMNIST, the examples and the test suite run offline with no
download step; 5,000 digits are enough to build tens of thousands of two-digit canvases.
"""
from __future__ import annotations

from importlib import resources

import numpy as np

MNIST_RESOURCE = "mnist_5k.npz"


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """Return `(images, labels)`: uint8 arrays of shape (5000, 28, 28) and (5000,).

    Pixels are 0..255 (ink is high), labels 0..9 with 500 digits per class. Fresh
    arrays are returned on every call, so callers may modify them freely.
    """
    with resources.files("graphsurgeon.data").joinpath(MNIST_RESOURCE).open("rb") as fh:
        with np.load(fh) as npz:
            return npz["images"].copy(), npz["labels"].copy()
