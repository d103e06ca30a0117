"""MultiWorkerMirroredStrategy on one machine: two local workers, one shard each.

The script writes a .npy array to a temporary folder, then starts two worker
processes (itself, with --worker), each with a TF_CONFIG naming both on
127.0.0.1. Each worker trains a StreamingModel on its own shard of the array
(`num_shards=2, shard_index=<its index>`, shuffled, last batch padded): every
worker runs exactly `len(dataset)` steps an epoch, and a row-counting metric,
summed over the workers, shows every row trained on once per epoch.

    python examples/multi_worker.py --rows 100000 --epochs 3

On a real cluster, run the worker part on each machine with its own TF_CONFIG.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

WORKERS = 2


def worker(
    index: int, ports: list[str], folder: Path, args: argparse.Namespace
) -> None:
    """One worker: train on shard `index` and print a JSON summary line."""
    os.environ["TF_CONFIG"] = json.dumps(
        {
            "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
            "task": {"type": "worker", "index": index},
        }
    )
    import keras
    import tensorflow as tf

    import keras_bigarray as kb

    class RowsSeen(keras.metrics.Metric):
        """Rows trained on: StreamingModel weights each row by its mask (0 for
        padding); variables sum over replicas and workers when read."""

        def __init__(self, name: str = "rows", **kw):
            super().__init__(name=name, **kw)
            self.rows = self.add_variable(shape=(), initializer="zeros", name="rows")

        def update_state(self, y_true, y_pred, sample_weight=None):
            ones = keras.ops.ones_like(y_true[:, 0])
            if sample_weight is not None:
                ones = ones * sample_weight
            self.rows.assign_add(keras.ops.sum(ones))

        def result(self):
            return self.rows

    # Create the strategy first: it starts the collective ops of this worker.
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    ds = kb.BigArrayDataset(
        folder / "x.npy",
        folder / "y.npy",
        batch_size=args.batch_size,
        shuffle=True,
        seed=0,
        pad_remainder=True,
        num_shards=WORKERS,
        shard_index=index,
    )
    with strategy.scope():
        inputs = keras.Input((ds.x.shape[1],))
        hidden = keras.layers.Dense(32, activation="relu")(inputs)
        model = kb.StreamingModel(inputs, keras.layers.Dense(1)(hidden))
        model.compile(keras.optimizers.Adam(1e-2), "mse", metrics=[RowsSeen()])
    steps: list[int] = []
    count = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda b, logs: steps.append(b)
    )
    hist = model.fit(ds, epochs=args.epochs, verbose=0, callbacks=[count])
    print(
        json.dumps(
            {
                "worker": index,
                "len": len(ds),
                "steps": len(steps),
                "rows": hist.history["rows"],
                "loss": hist.history["loss"],
            }
        ),
        flush=True,
    )


def free_ports(n: int) -> list[str]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [str(s.getsockname()[1]) for s in socks]
    for s in socks:
        s.close()
    return ports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument(
        "--batch-size", type=int, default=128, help="rows per worker and step"
    )
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ports", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker, args.ports.split(","), Path(args.folder), args)
        return

    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        x = rng.random((args.rows, 8), dtype=np.float32)
        np.save(Path(tmp) / "x.npy", x)
        np.save(Path(tmp) / "y.npy", (x @ np.arange(8, dtype=np.float32))[:, None])
        ports = free_ports(WORKERS)
        env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
        cmd = [
            sys.executable,
            __file__,
            "--rows",
            str(args.rows),
            "--epochs",
            str(args.epochs),
            "--batch-size",
            str(args.batch_size),
            "--ports",
            ",".join(ports),
            "--folder",
            tmp,
        ]
        print(f"starting {WORKERS} workers on 127.0.0.1:{','.join(ports)}", flush=True)
        procs = [
            subprocess.Popen(
                cmd + ["--worker", str(k)], stdout=subprocess.PIPE, text=True, env=env
            )
            for k in range(WORKERS)
        ]
        outs = [p.communicate()[0] for p in procs]
        if any(p.returncode for p in procs):
            sys.exit(f"a worker failed: exit codes {[p.returncode for p in procs]}")
        for out in outs:
            r = json.loads(out.strip().splitlines()[-1])
            print(
                f"worker {r['worker']}: {r['steps']} steps in {args.epochs} epochs "
                f"(len(dataset) = {r['len']}), "
                f"loss {r['loss'][0]:.3f} -> {r['loss'][-1]:.3f}"
            )
        rows = [int(v) for v in r["rows"]]
        print(f"rows trained per epoch, summed over workers: {rows} of {args.rows}")


if __name__ == "__main__":
    main()
