"""Keras's private `DataAdapter` class, guarded: `model.fit` passes a `DataAdapter`
instance straight through, so a `BigArrayDataset` that is one keeps its own batch
order (Keras would otherwise reorder a PyDataset's batches with `random`).
Keras passes adapters through since 3.7. The project requires 3.12, the oldest
release its whole Keras-facing suite passed on (3.12.0 and 3.15.1 tested); where the
import fails the dataset is a plain PyDataset, still exactly-once per epoch."""

from __future__ import annotations

from typing import Any

try:  # the module path has been stable since Keras 3.0; the pass-through since 3.7
    from keras.src.trainers.data_adapters import data_adapter_utils as _utils
    from keras.src.trainers.data_adapters.data_adapter import DataAdapter
except ImportError:  # pragma: no cover - a future Keras that moved it
    DataAdapter = object  # type: ignore[assignment,misc]
    _utils = None

AVAILABLE = DataAdapter is not object

__all__ = ["AVAILABLE", "DataAdapter", "jax_iterator", "torch_dataloader"]


def jax_iterator(batches: Any) -> Any:
    return _utils.get_jax_iterator(batches)


def torch_dataloader(batches: Any) -> Any:
    return _utils.get_torch_dataloader(batches)
