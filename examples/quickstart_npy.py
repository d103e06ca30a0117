"""Quick start: train a Keras model on .npy files without loading them.

Writes x.npy and y.npy into a temporary folder, opens them lazily with
`kb.open_array`, and feeds `model.fit`, `evaluate` and `predict` through a
`kb.BigArrayDataset`, with a global shuffle and a validation hold-out.

    python examples/quickstart_npy.py [--rows 20000]
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_bigarray as kb  # noqa: E402


def write_data(folder: str, rows: int) -> tuple[str, str]:
    """A toy task: is the sum of 32 features positive? Saved as .npy files."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, 32), dtype=np.float32)
    y = (x.sum(axis=1) > 0).astype(np.int32)
    x_path, y_path = os.path.join(folder, "x.npy"), os.path.join(folder, "y.npy")
    np.save(x_path, x)
    np.save(y_path, y)
    return x_path, y_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=20_000, help="rows to write")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        x_path, y_path = write_data(folder, args.rows)
        print(f"wrote {x_path} and {y_path} ({args.rows} rows)")

        # Lazy, read-only views: nothing but the .npy headers is read here.
        x = kb.open_array(x_path)
        y = kb.open_array(y_path)
        print(f"opened {x!r}")

        # Batches are read from disk as fit asks for them; the order is a
        # pure function of (seed, epoch, batch): reproducible, new each epoch.
        ds = kb.BigArrayDataset(x, y, batch_size=256, shuffle=True, seed=0)
        train, val = ds.validation_split(0.1)  # the last 10% of rows, unshuffled
        print(
            f"train: {train.num_rows} rows in {len(train)} batches, "
            f"validation: {val.num_rows} rows"
        )

        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((32,)),
                keras.layers.Dense(16, activation="relu"),
                keras.layers.Dense(1, activation="sigmoid"),
            ]
        )
        model.compile("adam", "binary_crossentropy", metrics=["accuracy"])
        model.fit(train, validation_data=val, epochs=args.epochs, verbose=2)

        loss, accuracy = model.evaluate(val, verbose=0)
        print(f"evaluate: loss {loss:.3f}, accuracy {accuracy:.3f}")

        # predict takes a dataset of x alone, in row order (shuffle=False).
        x_only = kb.BigArrayDataset(x, batch_size=1024, shuffle=False)
        scores = model.predict(x_only, verbose=0)
        print(f"predict: {scores.shape[0]} scores, first rows {scores[:3, 0].round(3)}")
        assert scores.shape == (args.rows, 1)


if __name__ == "__main__":
    main()
