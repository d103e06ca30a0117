"""A folder of .npy shards, opened by glob as one array.

Datasets written by several jobs often end up as part-0.npy, part-1.npy, ...
`kb.open_array("folder/part-*.npy")` concatenates them on axis 0 in natural
order (part-2 before part-10) without reading them; batches may span shards.

    python examples/shards_folder.py [--rows 20000]
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_bigarray as kb  # noqa: E402


def write_shards(folder: str, rows: int, shards: int) -> None:
    """A regression task split into `shards` .npy files of unequal length."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal(16).astype(np.float32)
    cuts = np.linspace(0, rows, shards + 1).astype(int)
    cuts[1:-1] += rng.integers(-5, 6, shards - 1)  # shards need not be equal
    os.makedirs(os.path.join(folder, "x"))
    os.makedirs(os.path.join(folder, "y"))
    for i in range(shards):
        n = int(cuts[i + 1] - cuts[i])
        x = rng.standard_normal((n, 16), dtype=np.float32)
        y = (x @ w + 0.1 * rng.standard_normal(n)).astype(np.float32)
        np.save(os.path.join(folder, "x", f"part-{i}.npy"), x)
        np.save(os.path.join(folder, "y", f"part-{i}.npy"), y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=20_000, help="rows to write")
    parser.add_argument("--shards", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        write_shards(folder, args.rows, args.shards)
        x = kb.open_array(os.path.join(folder, "x", "part-*.npy"))  # a glob...
        y = kb.open_array(os.path.join(folder, "y"))  # ...or the folder itself
        print(f"opened {len(x.parts)} shards as one array: x {x.shape}, y {y.shape}")

        ds = kb.BigArrayDataset(x, y, batch_size=512, shuffle=True, seed=0)
        train, val = ds.validation_split(0.1)

        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(1)])
        model.compile(keras.optimizers.Adam(0.05), "mse")
        history = model.fit(train, validation_data=val, epochs=args.epochs, verbose=2)
        print(
            f"validation mse: {history.history['val_loss'][0]:.3f} after epoch 1, "
            f"{history.history['val_loss'][-1]:.3f} after epoch {args.epochs}"
        )

        # Sequential predictions line up with the rows of the shards.
        pred = model.predict(
            kb.BigArrayDataset(x, batch_size=2048, shuffle=False), verbose=0
        )
        print(f"predict: {pred.shape[0]} rows from {len(x.parts)} shards")
        assert pred.shape == (len(x), 1)


if __name__ == "__main__":
    main()
