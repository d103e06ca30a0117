"""A custom train_step on uint8 images on disk: subclass StreamingModel.

Writes a synthetic image set to a temporary folder as uint8 .npy files (written
block by block, never whole in memory), computes the normalization statistics
out of core (`keras.layers.Normalization.adapt` over the streamed batches), and
trains a small CNN whose own `train_step` flips images inside the compiled step.
Batches travel as uint8 and are cast to float32 on the device; the last batch
of each epoch is padded, so the step is traced once.

    python examples/custom_train_step.py --rows 20000 --epochs 3
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_bigarray as kb  # noqa: E402

SIDE = 16  # image side, pixels
WRITE_ROWS = 4096  # images generated and written per block


def write_images(folder: Path, rows: int, seed: int = 0) -> tuple[Path, Path]:
    """Noisy uint8 images: class 1 has a bright bar in its left half, class 0 in
    its right half. Returns the paths of images (rows, SIDE, SIDE, 1) and labels."""
    rng = np.random.default_rng(seed)
    x_path, y_path = folder / "images.npy", folder / "labels.npy"
    x = np.lib.format.open_memmap(
        x_path, mode="w+", dtype=np.uint8, shape=(rows, SIDE, SIDE, 1)
    )
    y = np.lib.format.open_memmap(y_path, mode="w+", dtype=np.uint8, shape=(rows, 1))
    for start in range(0, rows, WRITE_ROWS):
        n = min(WRITE_ROWS, rows - start)
        labels = rng.integers(0, 2, n)
        img = rng.integers(0, 96, (n, SIDE, SIDE, 1))
        col = np.where(
            labels == 1, rng.integers(0, SIDE // 2, n), rng.integers(SIDE // 2, SIDE, n)
        )
        img[np.arange(n), :, col, 0] += 150
        x[start : start + n] = img.astype(np.uint8)
        y[start : start + n, 0] = labels
    x.flush()
    y.flush()
    del x, y  # close the memmaps before the folder is removed
    return x_path, y_path


class FlipCNN(kb.StreamingModel):
    """A small CNN on normalized images, trained on random vertical flips."""

    def __init__(self, norm: keras.layers.Normalization | None = None, **kw):
        super().__init__(**kw)
        self.norm = norm or keras.layers.Normalization(axis=None)
        # Used by train_step only (call never runs it), so built here.
        self.flip = keras.layers.RandomFlip("vertical", seed=1)
        self.flip.build((None, SIDE, SIDE, 1))
        self.conv = keras.layers.Conv2D(8, 3, activation="relu")
        self.pool = keras.layers.MaxPooling2D(4)
        self.flat = keras.layers.Flatten()
        self.head = keras.layers.Dense(1, activation="sigmoid")

    def call(self, x):
        # x arrives as float32: decode_inputs cast the uint8 batch on the device.
        return self.head(self.flat(self.pool(self.conv(self.norm(x)))))

    def train_step(self, data):
        x, y, sample_weight, mask = self.unpack_batch(data)
        x = self.flip(self.decode_inputs(x), training=True)
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            # The mean over the real rows (mask 1): padding changes nothing.
            loss = self.batch_loss(x, y, y_pred, sample_weight, mask)
            scaled = self.optimizer.scale_loss(loss)
        grads = tape.gradient(scaled, self.trainable_weights)
        self.optimizer.apply_gradients(zip(grads, self.trainable_weights, strict=True))
        return self.compute_metrics(x, y, y_pred, sample_weight, mask=mask)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=6000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        x_path, y_path = write_images(Path(tmp), args.rows)
        images, labels = kb.open_array(x_path), kb.open_array(y_path)
        print(
            f"wrote {images.shape[0]} images {images.shape[1:]} {images.dtype}: "
            f"{images.nbytes / 2**20:.1f} MiB"
        )

        # Statistics out of core: Normalization.adapt reads the streamed
        # batches one at a time, cast to float32 inside tf.data.
        norm = keras.layers.Normalization(axis=None)
        stream = kb.BigArrayDataset(images, batch_size=1024, shuffle=False)
        norm.adapt(stream.to_tf_dataset().map(lambda b: tf.cast(b[0], "float32")))
        mean, var = (
            float(norm.mean.numpy().squeeze()),
            float(norm.variance.numpy().squeeze()),
        )
        print(
            f"normalization: mean {mean:.2f}, std {var**0.5:.2f}, "
            f"from {len(stream)} streamed batches"
        )

        ds = kb.BigArrayDataset(
            images,
            labels,
            batch_size=args.batch_size,
            shuffle="block",
            seed=0,
            pad_remainder=True,
        )
        train, val = ds.validation_split(0.1)
        model = FlipCNN(norm)
        model.compile(
            keras.optimizers.Adam(3e-3), "binary_crossentropy", metrics=["accuracy"]
        )
        model.fit(train, validation_data=val, epochs=args.epochs, verbose=2)
        loss, acc = model.evaluate(val, verbose=0)
        print(f"evaluate: loss {loss:.4f}, accuracy {acc:.3f} on {val.num_rows} rows")
        pred = model.predict(val, verbose=0)
        print(f"predict: {len(pred)} rows (batches padded to {val.batch_size})")


if __name__ == "__main__":
    main()
