"""StreamingModel: padded training equals unpadded single-device Keras training
(weights, loss, metrics, predictions), on one device and on two replicas; one
trace per fit; jit_compile; uint8 inputs; multi-input/output; mixed precision;
functional and subclassed in either order; save and load."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import run_tf_script
from keras.src.models.functional import Functional

import keras_bigarray as kb
from keras_bigarray.training import FunctionalStreamingModel, StreamingModel

N, BATCH = 35, 16  # three batches: 16, 16 and 3 real rows


def make_data(n: int = N, zero_weights: bool = True) -> tuple[np.ndarray, ...]:
    rs = np.random.RandomState(0)
    x = rs.rand(n, 3).astype("float32")
    y = (x @ np.array([[1.0], [-2.0], [0.5]], "float32") + 0.3).astype("float32")
    w = (0.5 + rs.rand(n)).astype("float32")
    if zero_weights:
        w[::4] = 0.0  # real rows of weight 0: still in the loss's denominator
    return x, y, w


def mlp(cls: Any = keras.Model, d: int = 3) -> Any:
    keras.utils.set_random_seed(7)
    inputs = keras.Input((d,), name="x")
    h = keras.layers.Dense(8, activation="tanh")(inputs)
    return cls(inputs, keras.layers.Dense(1)(h))


def compile_(model: Any, **kw: Any) -> Any:
    model.compile(
        keras.optimizers.SGD(0.1, momentum=0.5, **kw.pop("opt", {})),
        "mse",
        metrics=["mae"],
        weighted_metrics=["mse"],
        **kw,
    )
    return model


def ds(
    x: Any, y: Any = None, w: Any = None, pad: bool = True, **kw: Any
) -> kb.BigArrayDataset:
    return kb.BigArrayDataset(
        x, y, w, batch_size=BATCH, shuffle=False, pad_remainder=pad, **kw
    )


def assert_weights_close(a: Any, b: Any, atol: float = 1e-6) -> None:
    for u, v in zip(a.get_weights(), b.get_weights(), strict=True):
        np.testing.assert_allclose(u, v, atol=atol, rtol=0)


def assert_history_close(h1: Any, h2: Any, rtol: float = 1e-5) -> None:
    assert set(h1.history) == set(h2.history)
    for k in h1.history:
        np.testing.assert_allclose(h1.history[k], h2.history[k], rtol=rtol, err_msg=k)


def test_unpadded_equals_plain_keras() -> None:
    x, y, w = make_data()
    ref = compile_(mlp())
    h_ref = ref.fit(
        x, y, sample_weight=w, batch_size=BATCH, epochs=2, shuffle=False, verbose=0
    )
    model = compile_(mlp(StreamingModel))
    h = model.fit(ds(x, y, w, pad=False), epochs=2, verbose=0)
    assert_weights_close(ref, model, atol=1e-7)
    assert_history_close(h_ref, h, rtol=1e-6)
    arrays = compile_(mlp(StreamingModel))  # numpy in, as with any keras.Model
    arrays.fit(
        x, y, sample_weight=w, batch_size=BATCH, epochs=2, shuffle=False, verbose=0
    )
    assert_weights_close(ref, arrays, atol=1e-7)


@pytest.mark.parametrize("weights", ["none", "with_zeros"])
def test_padded_equals_unpadded_plain_keras(weights: str) -> None:
    x, y, w = make_data()
    if weights == "none":
        w = None
    ref = compile_(mlp())
    h_ref = ref.fit(
        x, y, sample_weight=w, batch_size=BATCH, epochs=2, shuffle=False, verbose=0
    )
    model = compile_(mlp(StreamingModel))
    h = model.fit(ds(x, y, w), validation_data=ds(x, y, w), epochs=2, verbose=0)
    assert_weights_close(ref, model)
    for k in h_ref.history:
        np.testing.assert_allclose(h.history[k], h_ref.history[k], rtol=1e-5, err_msg=k)
    # Validation (after each epoch) equals Keras's evaluate on unpadded rows.
    np.testing.assert_allclose(
        [h.history[f"val_{k}"][-1] for k in ("loss", "mae", "mse")],
        ref.evaluate(x, y, sample_weight=w, batch_size=BATCH, verbose=0),
        rtol=1e-5,
    )
    pred = model.predict(ds(x), verbose=0)
    assert pred.shape == (N, 1)  # one prediction per real row, no padding
    np.testing.assert_allclose(pred, ref.predict(x, verbose=0), atol=1e-6)


def test_plain_keras_on_padded_batches_is_not_exact() -> None:
    # The bug StreamingModel fixes: Keras divides the padded last batch's loss
    # by the padded batch size, shrinking that batch's gradient.
    x, y, _ = make_data()
    ref = compile_(mlp())
    ref.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    plain = compile_(mlp())
    plain.fit(ds(x, y), epochs=1, verbose=0)
    model = compile_(mlp(StreamingModel))
    model.fit(ds(x, y), epochs=1, verbose=0)
    assert_weights_close(ref, model)
    gap = max(
        np.abs(a - b).max()
        for a, b in zip(ref.get_weights(), plain.get_weights(), strict=True)
    )
    assert gap > 1e-4


class CountingModel(StreamingModel):
    """Counts how often Keras traces each step (Python runs once per trace)."""

    traces: dict[str, int] = {}

    def train_step(self, data: Any) -> Any:
        self.traces["train"] = self.traces.get("train", 0) + 1
        return super().train_step(data)

    def test_step(self, data: Any) -> Any:
        self.traces["test"] = self.traces.get("test", 0) + 1
        return super().test_step(data)


def test_one_trace_per_fit_with_padding_under_jit_compile() -> None:
    x, y, w = make_data(70)  # five batches, the last of 6 real rows
    CountingModel.traces = {}
    ref = compile_(mlp(), jit_compile=True)
    ref.fit(x, y, sample_weight=w, batch_size=BATCH, epochs=3, shuffle=False, verbose=0)
    model = compile_(mlp(CountingModel), jit_compile=True, steps_per_execution=2)
    assert isinstance(model, FunctionalStreamingModel) and model.jit_compile
    model.fit(ds(x, y, w), validation_data=ds(x, y, w), epochs=3, verbose=0)
    assert CountingModel.traces == {"train": 1, "test": 1}
    assert_weights_close(ref, model, atol=1e-5)


def test_uint8_inputs_are_cast_on_the_device() -> None:
    rs = np.random.RandomState(1)
    pixels = rs.randint(0, 256, size=(N, 4, 4), dtype=np.uint8)
    y = (pixels.reshape(N, -1).mean(axis=1, keepdims=True) / 255).astype("float32")
    seen: dict[str, Any] = {}

    class Pixels(StreamingModel):
        def __init__(self, **kw: Any):
            super().__init__(**kw)
            self.flat = keras.layers.Flatten()
            self.out = keras.layers.Dense(1)

        def train_step(self, data: Any) -> Any:
            seen["step"] = self.unpack_batch(data)[0].dtype  # what crossed
            return super().train_step(data)

        def call(self, x: Any) -> Any:
            seen["call"] = x.dtype
            return self.out(self.flat(x) / 255.0)

    keras.utils.set_random_seed(3)
    model = Pixels()
    model.compile(keras.optimizers.SGD(0.1), "mse")
    data = ds(pixels, y)
    spec = data.to_tf_dataset().element_spec
    assert spec[0].dtype == tf.uint8 and spec[0].shape == (BATCH, 4, 4)
    model.fit(data, epochs=2, verbose=0)
    assert seen == {"step": tf.uint8, "call": tf.float32}

    keras.utils.set_random_seed(3)
    ref = Pixels()
    ref.compile(keras.optimizers.SGD(0.1), "mse")
    ref.fit(
        pixels.astype("float32"),
        y,
        batch_size=BATCH,
        epochs=2,
        shuffle=False,
        verbose=0,
    )
    assert_weights_close(ref, model)


def test_multi_input_multi_output_with_weights() -> None:
    x, y, w = make_data()
    rs = np.random.RandomState(2)
    z = rs.rand(N, 2).astype("float32")
    labels = (x[:, :1] > 0.5).astype("float32")

    def build(cls: Any) -> Any:
        keras.utils.set_random_seed(5)
        a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
        h = keras.layers.Dense(6, activation="relu")(keras.layers.Concatenate()([a, b]))
        reg = keras.layers.Dense(1, name="reg")(h)
        cls_ = keras.layers.Dense(1, activation="sigmoid", name="cls")(h)
        model = cls({"a": a, "b": b}, {"reg": reg, "cls": cls_})
        model.compile(
            keras.optimizers.SGD(0.1),
            loss={"reg": "mse", "cls": "binary_crossentropy"},
            loss_weights={"reg": 1.0, "cls": 0.5},
            metrics={"cls": ["accuracy"]},
            weighted_metrics={"reg": ["mae"]},
        )
        return model

    inputs, targets = {"a": x, "b": z}, {"reg": y, "cls": labels}
    ref = build(keras.Model)
    h_ref = ref.fit(
        inputs,
        targets,
        sample_weight=w,
        batch_size=BATCH,
        epochs=2,
        shuffle=False,
        verbose=0,
    )
    model = build(StreamingModel)
    h = model.fit(ds(inputs, targets, w), epochs=2, verbose=0)
    assert_weights_close(ref, model)
    for k in ("loss", "cls_accuracy", "reg_mae"):
        np.testing.assert_allclose(h.history[k], h_ref.history[k], rtol=1e-5, err_msg=k)
    pred = model.predict(ds(inputs), verbose=0)
    assert pred["reg"].shape == (N, 1) and pred["cls"].shape == (N, 1)
    np.testing.assert_allclose(
        pred["cls"], ref.predict(inputs, verbose=0)["cls"], atol=1e-6
    )


def test_mixed_precision_with_loss_scaling_and_gradient_accumulation() -> None:
    x, y, w = make_data()
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        ref = compile_(mlp(), opt={"gradient_accumulation_steps": 2})
        ref.fit(
            x, y, sample_weight=w, batch_size=BATCH, epochs=2, shuffle=False, verbose=0
        )
        model = compile_(mlp(StreamingModel), opt={"gradient_accumulation_steps": 2})
        model.fit(ds(x, y, w), epochs=2, verbose=0)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert model.compute_dtype == "float16"
    assert_weights_close(ref, model, atol=2e-3)


def test_functional_and_subclassed_in_either_order() -> None:
    x, y, _ = make_data()

    class Net(StreamingModel):
        def __init__(self, **kw: Any):
            super().__init__(**kw)
            self.dense = keras.layers.Dense(1)

        def call(self, inputs: Any) -> Any:
            return self.dense(inputs)

    class Tagged(StreamingModel):  # a subclass used functionally
        pass

    def train(model: Any) -> float:
        model.compile("sgd", "mse")
        return model.fit(ds(x, y), epochs=1, verbose=0).history["loss"][0]

    bases = StreamingModel.__bases__
    for make in (
        lambda: Net(),
        lambda: mlp(StreamingModel),
        lambda: mlp(Tagged),
        lambda: Net(),
        lambda: mlp(StreamingModel),
    ):
        model = make()
        assert isinstance(model, StreamingModel)
        assert np.isfinite(train(model))
    assert StreamingModel.__bases__ == bases  # Keras's class injection left it alone
    assert not isinstance(Net(), Functional)
    assert isinstance(mlp(Tagged), Functional)


@keras.saving.register_keras_serializable(package="test_training")
class Scaled(StreamingModel):
    def __init__(self, units: int = 2, **kw: Any):
        super().__init__(**kw)
        self.units = units
        self.dense = keras.layers.Dense(units)

    def call(self, inputs: Any) -> Any:
        return self.dense(inputs) * 2.0

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "units": self.units}


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    x, y, w = make_data()
    for model in (compile_(mlp(StreamingModel)), compile_(Scaled(units=1))):
        model.fit(ds(x, y, w), epochs=1, verbose=0)
        path = tmp_path / f"{model.name}.keras"
        model.save(path)
        loaded = keras.models.load_model(path)
        assert type(loaded) is type(model)
        np.testing.assert_allclose(
            loaded.predict(ds(x), verbose=0), model.predict(ds(x), verbose=0)
        )
        # The compiled state travels: training goes on from the same optimizer.
        model.fit(ds(x, y, w), epochs=1, verbose=0)
        loaded.fit(ds(x, y, w), epochs=1, verbose=0)
        assert_weights_close(model, loaded, atol=1e-6)


def test_other_backends_get_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(RuntimeError, match="TensorFlow backend.*'jax'"):
        mlp(StreamingModel)


def test_class_weight_with_a_dataset_is_an_error() -> None:
    x, y, _ = make_data()
    model = compile_(mlp(StreamingModel))
    with pytest.raises(ValueError, match="class_weight"):
        model.fit(ds(x, y), class_weight={0: 1.0}, verbose=0)


MIRRORED = textwrap.dedent(
    """
    import json, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2
    )
    sys.path.insert(0, sys.argv[1])
    import keras
    import keras_bigarray as kb
    from test_training import compile_, ds, make_data, mlp, N, BATCH

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    out = {"replicas": strategy.num_replicas_in_sync}
    for pad in (True, False):
        for zeros in (True, None):  # weights with zeros, or no weights
            x, y, w = make_data(zero_weights=bool(zeros))
            w = w if zeros else None
            ref = compile_(mlp())
            h_ref = ref.fit(x, y, sample_weight=w, batch_size=BATCH, epochs=2,
                            shuffle=False, verbose=0)
            with strategy.scope():
                model = compile_(mlp(kb.StreamingModel))
            h = model.fit(ds(x, y, w, pad=pad), epochs=2, verbose=0)
            pred = model.predict(ds(x, pad=pad), verbose=0)
            key = f"pad={pad},zeros={zeros}"
            out[key] = {
                "weights": max(
                    float(np.abs(a - b).max())
                    for a, b in zip(ref.get_weights(), model.get_weights())
                ),
                "logs": max(
                    float(np.abs(np.subtract(h.history[k], h_ref.history[k])).max())
                    / float(np.abs(h_ref.history[k]).max())
                    for k in h_ref.history
                ),
                "rows": len(pred),
                "pred": float(np.abs(pred - ref.predict(x, verbose=0)).max()),
            }
    print(json.dumps(out))
    """
)


def test_mirrored_strategy_two_replicas_equals_single_device() -> None:
    # TensorFlow fixes its devices at start-up: two logical CPUs need a fresh process.
    out = run_tf_script(
        MIRRORED, str(Path(__file__).parent), KERAS_BACKEND="tensorflow"
    )
    assert out.pop("replicas") == 2
    assert len(out) == 4
    for key, r in out.items():
        assert r["rows"] == N, key
        assert r["weights"] < 1e-6 and r["pred"] < 1e-5 and r["logs"] < 1e-5, (key, r)


def test_shuffled_fit_trains_dataset_epochs_in_order() -> None:
    # fit's epoch k is the dataset's epoch k: the same batches as ds.sampler says.
    x, y, w = make_data()
    data = kb.BigArrayDataset(
        x, y, w, batch_size=BATCH, shuffle=True, seed=11, pad_remainder=True
    )
    model = compile_(mlp(StreamingModel))
    model.fit(data, epochs=2, verbose=0)
    ref = compile_(mlp())
    for epoch in range(2):
        for i in range(len(data)):
            rows = data.sampler.batch(epoch, i)[0]
            ref.train_on_batch(x[rows], y[rows], sample_weight=w[rows])
    assert_weights_close(ref, model)


def test_sequence_outputs_get_row_weights_of_the_loss_rank() -> None:
    # Per-timestep losses (b, t): the row mask must broadcast as (b, 1).
    x, _, _ = make_data()
    y = np.random.RandomState(4).rand(N, 4, 2).astype("float32")

    def build(cls: Any) -> Any:
        keras.utils.set_random_seed(5)
        inputs = keras.Input((3,))
        out = keras.layers.Reshape((4, 2))(keras.layers.Dense(8)(inputs))
        model = cls(inputs, out)
        model.compile(keras.optimizers.SGD(0.1), "mse", metrics=["mae"])
        return model

    ref = build(keras.Model)
    h_ref = ref.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    model = build(StreamingModel)
    h = model.fit(ds(x, y), epochs=2, verbose=0)
    assert_weights_close(ref, model)
    assert_history_close(h_ref, h)
