"""The tf.data path: one model trained from `ds.to_tf_dataset()` with batches
prefetched to the accelerator, then under `tf.distribute.MirroredStrategy`, fed by
the dataset itself and by `kb.distribute_dataset`.

Without a GPU, the strategy runs over two logical CPU devices, and device
prefetch targets the CPU: the same code paths, on any machine.

    python examples/tf_data.py [--rows 50000] [--epochs 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

# Devices are fixed when TensorFlow starts: split the CPU in two before anything
# touches it, so MirroredStrategy has two replicas on a machine without GPUs.
GPUS = tf.config.list_physical_devices("GPU")
if len(GPUS) < 2:
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2
    )

import keras  # noqa: E402

import keras_bigarray as kb  # noqa: E402


def write_data(folder: str, rows: int) -> tuple[str, str]:
    """uint8 "images" of 8x8 with a label: is the top half brighter?"""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(rows, 8, 8), dtype=np.uint8)
    y = (x[:, :4].mean(axis=(1, 2)) > x[:, 4:].mean(axis=(1, 2))).astype(np.int32)
    paths = os.path.join(folder, "x.npy"), os.path.join(folder, "y.npy")
    np.save(paths[0], x)
    np.save(paths[1], y)
    return paths


def make_model() -> keras.Model:
    # uint8 travels to the device as uint8; the model casts it there.
    inputs = keras.Input((8, 8), dtype="uint8")
    h = keras.layers.Rescaling(1 / 255)(keras.layers.Flatten()(inputs))
    h = keras.layers.Dense(32, activation="relu")(h)
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(h))
    model.compile("adam", "binary_crossentropy", metrics=["accuracy"])
    return model


def fit(name: str, model: keras.Model, data: object, rows: int, epochs: int) -> None:
    start = time.perf_counter()
    hist = model.fit(data, epochs=epochs, verbose=0)
    seconds = time.perf_counter() - start
    acc = hist.history["accuracy"][-1]
    print(f"{name}: {epochs * rows / seconds:,.0f} rows/s, accuracy {acc:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=512)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        x_path, y_path = write_data(folder, args.rows)
        ds = kb.BigArrayDataset(
            x_path, y_path, batch_size=args.batch_size, shuffle=True, seed=0
        )
        spec = ds.to_tf_dataset().element_spec
        print(
            f"element_spec: x {spec[0].dtype.name} {spec[0].shape}, y {spec[1].shape}"
        )

        # 1. One device: fit reads through ds.to_tf_dataset(device=...), which
        # prefetches batches onto the device as its last transformation.
        device = "/gpu:0" if GPUS else "/cpu:0"
        on_device = ds.replace(prefetch_to_device=device)
        first = next(iter(on_device.to_tf_dataset(device=device)))
        print(f"a batch is on {first[0].device}")
        keras.utils.set_random_seed(0)
        fit(
            f"fit(ds) with prefetch_to_device={device!r}",
            make_model(),
            on_device,
            args.rows,
            args.epochs,
        )

        # 2. MirroredStrategy: the global batch is split over the replicas.
        devices = [
            d.name
            for d in tf.config.list_logical_devices("GPU" if len(GPUS) > 1 else "CPU")
        ]
        strategy = tf.distribute.MirroredStrategy(devices)
        print(
            f"MirroredStrategy over {strategy.num_replicas_in_sync} replicas: {devices}"
        )
        with strategy.scope():
            keras.utils.set_random_seed(0)
            model = make_model()
        fit("MirroredStrategy, fit(ds)", model, ds, args.rows, args.epochs)

        # 3. Per-worker input pipelines: each worker reads only its own shard.
        with strategy.scope():
            keras.utils.set_random_seed(0)
            model = make_model()
        fit(
            "MirroredStrategy, fit(kb.distribute_dataset(strategy, ds))",
            model,
            kb.distribute_dataset(strategy, ds),
            args.rows,
            args.epochs,
        )


if __name__ == "__main__":
    main()
