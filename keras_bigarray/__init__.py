"""keras-bigarray: arrays on disk (.npy, raw, HDF5, shards) as a first-class Keras
input, streamed with bounded memory, shuffled exactly and sharded correctly.

`open_array` and the numpy layers import without Keras or TensorFlow; the Keras
names (`BigArrayDataset`, ...) import Keras on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from keras_bigarray.reading import BatchReadError
from keras_bigarray.sampling import Permutation, Sampler
from keras_bigarray.sources import BigArray, open_array

if TYPE_CHECKING:
    from keras_bigarray.dataset import BigArrayDataset

__version__ = "0.1.0"

__all__ = [
    "BatchReadError",
    "BigArray",
    "BigArrayDataset",
    "Permutation",
    "Sampler",
    "StreamingModel",
    "__version__",
    "distribute_dataset",
    "open_array",
]

_LAZY = {
    "BigArrayDataset": "keras_bigarray.dataset",
    "StreamingModel": "keras_bigarray.training",
    "distribute_dataset": "keras_bigarray.tf_data",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'keras_bigarray' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
