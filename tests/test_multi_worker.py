"""StreamingModel under MultiWorkerMirroredStrategy: two local worker processes
(TF_CONFIG on 127.0.0.1) fit a shuffled, padded BigArrayDataset, either one shard
per worker or unsharded with the global batch size. Every worker runs exactly
len(dataset) steps an epoch, every row is trained on once (row-counting metrics
summed over workers), and the weights equal single-device Keras training on the
same global batches. Run as a script, this file is one worker."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

N, BATCH, EPOCHS, SEED = 37, 4, 2, 3  # per-worker batch 4: 5 steps, the last padded


def make_data() -> tuple[np.ndarray, np.ndarray]:
    x = np.random.RandomState(0).rand(N, 3).astype("float32")
    y = np.arange(N, dtype="float32")[:, None]  # row ids: the metrics count them
    return x, y


def build(keras: Any, cls: Any) -> Any:
    keras.utils.set_random_seed(1)
    inputs = keras.Input((3,))
    return cls(
        inputs, keras.layers.Dense(1)(keras.layers.Dense(4, activation="tanh")(inputs))
    )


def datasets(kb: Any, x: np.ndarray, y: np.ndarray, index: int) -> dict[str, Any]:
    """This worker's dataset in both forms StreamingModel takes."""
    common = dict(shuffle=True, seed=SEED, pad_remainder=True)
    return {
        "sharded": kb.BigArrayDataset(
            x, y, batch_size=BATCH, num_shards=2, shard_index=index, **common
        ),
        "global": kb.BigArrayDataset(x, y, batch_size=2 * BATCH, **common),
    }


def worker(index: int, ports: list[str], out: Path) -> None:
    os.environ["TF_CONFIG"] = json.dumps(
        {
            "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
            "task": {"type": "worker", "index": index},
        }
    )
    import keras
    import tensorflow as tf

    import keras_bigarray as kb

    class RowStat(keras.metrics.Metric):
        """Sum of the row ids (or count of rows) trained on; padding has weight 0."""

        def __init__(self, name: str, **kw: Any):
            super().__init__(name=name, **kw)
            self.total = self.add_variable(shape=(), initializer="zeros", name="total")

        def update_state(
            self, y_true: Any, y_pred: Any, sample_weight: Any = None
        ) -> None:
            v = (
                y_true[:, 0]
                if self.name == "id_sum"
                else keras.ops.ones_like(y_true[:, 0])
            )
            if sample_weight is not None:  # StreamingModel: the row mask
                v = v * sample_weight
            self.total.assign_add(keras.ops.sum(v))

        def result(self) -> Any:
            return self.total

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    x, y = make_data()
    result: dict[str, Any] = {"replicas": strategy.num_replicas_in_sync}
    for how, ds in datasets(kb, x, y, index).items():
        with strategy.scope():
            model = build(keras, kb.StreamingModel)
            model.compile(
                keras.optimizers.SGD(0.01),
                "mse",
                metrics=[RowStat("id_sum"), RowStat("rows")],
            )
        steps: list[int] = []
        counter = keras.callbacks.LambdaCallback(
            on_train_batch_end=lambda batch, logs, steps=steps: steps.append(batch)
        )
        hist = model.fit(ds, epochs=EPOCHS, verbose=0, callbacks=[counter])
        result[how] = {
            "len": len(ds),
            "steps": len(steps),
            "history": hist.history,
            "weights": [w.tolist() for w in model.get_weights()],
        }
    (out / f"worker{index}.json").write_text(json.dumps(result))


def free_ports(n: int) -> list[str]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [str(s.getsockname()[1]) for s in socks]
    for s in socks:
        s.close()
    return ports


def single_device_reference(how: str) -> list[np.ndarray]:
    """Plain Keras, one device, trained on each step's global batch: the real
    rows of both workers' batch i, in the dataset's epoch order."""
    import keras

    import keras_bigarray as kb

    x, y = make_data()
    shards = [datasets(kb, x, y, k)["sharded"] for k in range(2)]
    if how == "global":  # what each worker reads of the global dataset
        shards = [
            d.replace(batch_size=BATCH, num_shards=2, shard_index=k)
            for k, d in enumerate(datasets(kb, x, y, 0)["global"] for _ in range(2))
        ]
    ref = build(keras, keras.Model)
    ref.compile(keras.optimizers.SGD(0.01), "mse")
    for epoch in range(EPOCHS):
        for i in range(len(shards[0])):
            rows = np.concatenate([s.sampler.batch(epoch, i)[0] for s in shards])
            ref.train_on_batch(x[rows], y[rows])
    return ref.get_weights()


def test_two_workers_train_every_row_once_with_single_device_weights(
    tmp_path: Path,
) -> None:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow")
    env.pop("TF_CONFIG", None)
    ports = free_ports(2)
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(k), ",".join(ports), str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for k in range(2)
    ]
    try:
        errs = [p.communicate(timeout=300)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, err in zip(procs, errs, strict=True):
        assert p.returncode == 0, err[-4000:]
    results = [json.loads((tmp_path / f"worker{k}.json").read_text()) for k in range(2)]
    for how in ("sharded", "global"):
        expected = single_device_reference(how)
        for r in results:
            assert r["replicas"] == 2
            run = r[how]
            assert run["len"] == 5 and run["steps"] == EPOCHS * run["len"], how
            assert run["history"]["rows"] == [N] * EPOCHS, how
            assert run["history"]["id_sum"] == [N * (N - 1) / 2] * EPOCHS, how
            for got, want in zip(run["weights"], expected, strict=True):
                np.testing.assert_allclose(got, want, atol=1e-5, err_msg=how)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    worker(int(sys.argv[1]), sys.argv[2].split(","), Path(sys.argv[3]))
