"""model.fit / evaluate / predict on BigArrayDataset: every source kind, our batch
order kept by fit, a new order each epoch, workers, and the tf.data path."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
from conftest import indexed_rows, open_kind, row_ids

import keras_bigarray as kb

N = 34


def small_model(features: int = 3) -> keras.Model:
    model = keras.Sequential([keras.Input((features,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse")
    return model


def test_fit_evaluate_predict_on_every_source_kind(tmp_path, source_kind):
    x = open_kind(source_kind, tmp_path, indexed_rows(N))
    y = np.zeros((N, 2), dtype="float32")
    ds = kb.BigArrayDataset(x, y, batch_size=16, shuffle=True, seed=0)
    model = small_model()
    hist = model.fit(ds, epochs=2, verbose=0)
    assert len(hist.history["loss"]) == 2
    assert np.isfinite(model.evaluate(ds, verbose=0))
    pred_ds = kb.BigArrayDataset(x, batch_size=16, shuffle=False)
    pred = model.predict(pred_ds, verbose=0)
    assert pred.shape == (N, 2)
    want = model.predict(indexed_rows(N), verbose=0)
    np.testing.assert_allclose(pred, want, rtol=1e-5, atol=1e-5)


class Recorder(keras.Model):
    """Records the targets of every training batch, in the order fit feeds them."""

    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(1)
        self.batches: list[list[int]] = []

    def call(self, x):
        return self.dense(x)

    def train_step(self, data):
        self.batches.append(np.asarray(data[1]).tolist())
        return {"rows": float(len(self.batches[-1]))}


def test_fit_is_handed_the_dataset_itself_and_keeps_our_order():
    from keras.src.trainers.data_adapters import get_data_adapter

    ds = kb.BigArrayDataset(
        indexed_rows(N), np.arange(N), batch_size=8, shuffle=True, seed=1
    )
    assert get_data_adapter(ds, shuffle=True) is ds
    model = Recorder()
    model.compile(optimizer="sgd", loss="mse", run_eagerly=True)
    model.fit(ds, epochs=3, verbose=0)  # fit(shuffle=True), Keras's default
    fed = [
        model.batches[i : i + len(ds)] for i in range(0, len(model.batches), len(ds))
    ]
    assert len(fed) == 3
    ours = [[b[1].tolist() for b in ds.iterate_epoch(e)] for e in range(6)]
    for epoch in fed:
        assert epoch in ours, (
            "fit fed batches in an order that is not one of our epochs"
        )
    assert len({str(e) for e in fed}) == 3, "every epoch has a new order"


@pytest.mark.parametrize("workers,mp", [(2, False), (2, True)])
def test_fit_with_workers_reads_every_row_each_epoch(tmp_path, workers, mp):
    x = open_kind("h5_chunked", tmp_path, indexed_rows(N))
    ds = kb.BigArrayDataset(
        x,
        np.arange(N, dtype="float32"),
        batch_size=8,
        shuffle="block",
        seed=3,
        workers=workers,
        use_multiprocessing=mp,
        mp_context="spawn" if mp else None,
    )

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    model.fit(ds, epochs=2, verbose=0)
    assert np.isfinite(model.evaluate(ds, verbose=0))


def test_validation_data_and_predict_one_row_per_input(tmp_path):
    x = open_kind("npy", tmp_path, indexed_rows(101))
    ds = kb.BigArrayDataset(x, np.zeros((101, 2), "float32"), batch_size=16, seed=0)
    train, val = ds.validation_split(0.1)
    model = small_model()
    hist = model.fit(train, validation_data=val, epochs=2, verbose=0)
    assert "val_loss" in hist.history
    assert model.predict(val, verbose=0).shape == (val.num_rows, 2)


def test_tf_dataset_spec_epochs_and_device():
    tf = pytest.importorskip("tensorflow")
    x = indexed_rows(N, (3,), "uint8")
    ds = kb.BigArrayDataset(x, np.arange(N), batch_size=16, shuffle=True, seed=2)
    tfds = ds.to_tf_dataset()
    xs, ys = tfds.element_spec
    assert xs.dtype == tf.uint8 and tuple(xs.shape) == (None, 3)
    e0 = np.concatenate([b[1].numpy() for b in tfds])
    e1 = np.concatenate([b[1].numpy() for b in tfds])
    assert sorted(e0.tolist()) == sorted(e1.tolist()) == list(range(N))
    assert e0.tolist() != e1.tolist(), "each full iteration is the next epoch"
    # The same batches as ds[i] of those epochs.
    ref = np.concatenate([b[1] for b in ds.iterate_epoch(0)])
    np.testing.assert_array_equal(e0, ref)
    for bx, by in tfds:
        np.testing.assert_array_equal(row_ids(bx.numpy()), by.numpy() % 256)
    padded = kb.BigArrayDataset(x, np.arange(N), batch_size=16, pad_remainder=True)
    assert tuple(padded.to_tf_dataset().element_spec[0].shape) == (16, 3)
    on_dev = ds.to_tf_dataset(device="/cpu:0")
    first = next(iter(on_dev))
    assert "CPU:0" in first[0].device


def test_tf_dataset_holds_no_data_in_the_graph(tmp_path):
    tf = pytest.importorskip("tensorflow")
    big = np.zeros((100_000, 256), dtype="float32")  # 100 MB
    np.save(tmp_path / "big.npy", big)
    ds = kb.BigArrayDataset(str(tmp_path / "big.npy"), batch_size=1024)
    graph = ds.to_tf_dataset()._as_serialized_graph(
        external_state_policy=tf.data.experimental.ExternalStatePolicy.WARN
    )
    assert len(graph.numpy()) < 100_000


def test_sharded_tf_dataset_turns_auto_shard_off():
    tf = pytest.importorskip("tensorflow")
    ds = kb.BigArrayDataset(
        np.zeros((40, 1)), batch_size=4, num_shards=2, shard_index=1
    )
    policy = ds.to_tf_dataset().options().experimental_distribute.auto_shard_policy
    assert policy == tf.data.experimental.AutoShardPolicy.OFF


def test_tf_dataset_turns_the_autotuner_off():
    # Its buffers and parallelism are fixed; autotuning them stalled whole
    # epochs on a 2-core machine. fit(ds) takes the same pipeline.
    ds = kb.BigArrayDataset(np.zeros((40, 1)), batch_size=4)
    assert ds.to_tf_dataset().options().autotune.enabled is False
    assert ds.get_tf_dataset().options().autotune.enabled is False


@pytest.mark.parametrize("mp", [False, True])
def test_list_targets_reach_a_two_output_model(mp):
    inputs = keras.Input((3,))
    model = keras.Model(
        inputs, [keras.layers.Dense(1)(inputs), keras.layers.Dense(2)(inputs)]
    )
    model.compile("sgd", ["mse", "mse"])
    ds = kb.BigArrayDataset(
        indexed_rows(N),
        [np.zeros((N, 1), "float32"), np.zeros((N, 2), "float32")],
        batch_size=8,
        seed=0,
        workers=2 if mp else 1,
        use_multiprocessing=mp,
        mp_context="spawn" if mp else None,
    )
    spec = ds.to_tf_dataset().element_spec
    assert isinstance(spec[1], tuple) and len(spec[1]) == 2
    hist = model.fit(ds, epochs=1, verbose=0)
    assert np.isfinite(hist.history["loss"][0])


def test_fit_with_prefetch_to_device_counts_its_steps():
    ds = kb.BigArrayDataset(
        indexed_rows(N),
        np.zeros((N, 2), "float32"),
        batch_size=8,
        seed=0,
        prefetch_to_device="/cpu:0",
    )
    assert ds.replace(batch_size=4).prefetch_to_device == "/cpu:0"
    model = small_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "input ran out of data"
        hist = model.fit(ds, epochs=2, verbose=0)
    assert len(hist.history["loss"]) == 2
