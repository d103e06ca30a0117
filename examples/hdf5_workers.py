"""HDF5 with worker processes: a chunked HDF5 file read by 2 processes.

h5py handles cannot be pickled or used after fork; a `BigArrayDataset` sends
each worker the file name and key, and the worker reopens the file itself. The
block shuffle reads whole HDF5 chunks in a permuted order, near-sequentially.

    python examples/hdf5_workers.py [--rows 20000]
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import h5py  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_bigarray as kb  # noqa: E402


def write_data(path: str, rows: int) -> None:
    """28x28 uint8 "images" whose class is the brightest quadrant, gzip-chunked."""
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        images = f.create_dataset(
            "images",
            shape=(rows, 28, 28),
            dtype="uint8",
            chunks=(256, 28, 28),
            compression="gzip",
        )
        labels = f.create_dataset("labels", shape=(rows,), dtype="int64")
        for start in range(0, rows, 4096):  # written in pieces, as a big file would be
            n = min(4096, rows - start)
            y = rng.integers(0, 4, n)
            img = rng.integers(0, 128, (n, 28, 28), dtype=np.uint8)
            for q in range(4):
                r, c = divmod(q, 2)
                img[y == q, r * 14 : (r + 1) * 14, c * 14 : (c + 1) * 14] += 32
            images[start : start + n] = img
            labels[start : start + n] = y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=20_000, help="rows to write")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "data.h5")
        write_data(path, args.rows)
        x = kb.open_array(path, key="images")
        y = kb.open_array(path, key="labels")
        print(
            f"wrote {path}: images {x.shape} {x.dtype}, chunks of "
            f"{x.block_rows} rows, gzip; labels {y.shape}"
        )

        ds = kb.BigArrayDataset(
            x,
            y,
            batch_size=256,
            shuffle="block",  # whole chunks, each decoded once an epoch
            seed=0,
            workers=2,  # two reader processes...
            use_multiprocessing=True,  # ...that reopen the HDF5 file themselves
        )
        train, val = ds.validation_split(0.1)
        print(
            f"train: {len(train)} batches read by {train.workers} processes, "
            f"validation: {val.num_rows} rows"
        )

        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((28, 28)),
                # uint8 pixels arrive as stored; scale them inside the model.
                keras.layers.Rescaling(1 / 255),
                keras.layers.Reshape((28, 28, 1)),
                keras.layers.AveragePooling2D(14),  # the 4 quadrants' brightness
                keras.layers.Flatten(),
                keras.layers.Dense(4),
            ]
        )
        model.compile(
            keras.optimizers.Adam(0.1),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        model.fit(train, validation_data=val, epochs=args.epochs, verbose=2)
        loss, accuracy = model.evaluate(val, verbose=0)
        print(f"evaluate: loss {loss:.3f}, accuracy {accuracy:.3f} (chance 0.25)")


if __name__ == "__main__":  # required: worker processes import this file
    main()
