"""tf.distribute: MirroredStrategy over two logical CPU devices, fed by the dataset
itself, by to_tf_dataset() and by distribute_dataset(), from memory, .npy files and
direct-I/O windows; every row trained once an epoch. TensorFlow fixes its devices
at start-up, so each case runs in a subprocess."""

from __future__ import annotations

import textwrap

import pytest
from conftest import run_tf_script

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2
    )
    import keras
    import keras_bigarray as kb

    how, n, batch, source = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]

    class RowStat(keras.metrics.Metric):
        # The sum (or count) of the row ids trained on, summed over replicas.
        def __init__(self, name, **kw):
            super().__init__(name=name, **kw)
            self.total = self.add_variable(shape=(), initializer="zeros", name="t")

        def update_state(self, y_true, y_pred, sample_weight=None):
            ids = keras.ops.cast(y_true[:, 0], "float32")
            if self.name == "count":
                ids = keras.ops.ones_like(ids)
            self.total.assign_add(keras.ops.sum(ids))

        def result(self):
            return self.total * 1.0

    x = np.repeat(np.arange(n, dtype="float32")[:, None], 4, axis=1)
    y = np.arange(n, dtype="float32")[:, None]
    shuffle = True
    if source != "memory":  # gathered by tf.gather from the files' memory maps
        import tempfile
        folder = tempfile.mkdtemp()
        np.save(os.path.join(folder, "x.npy"), x)
        np.save(os.path.join(folder, "y.npy"), y)
        x, y = os.path.join(folder, "x.npy"), os.path.join(folder, "y.npy")
    if source == "npy-direct":  # from each direct-I/O window's buffer
        x = kb.open_array(x)
        x.direct_io = True
        shuffle = "block"
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    ds = kb.BigArrayDataset(x, y, batch_size=batch, shuffle=shuffle, seed=0)
    with strategy.scope():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        model.compile("sgd", "mse", metrics=[RowStat("sum"), RowStat("count")])
    data = {
        "dataset": ds,
        "to_tf_dataset": ds.to_tf_dataset(),
        "distribute_dataset": kb.distribute_dataset(strategy, ds),
    }[how]
    hist = model.fit(data, epochs=2, verbose=0)
    h = hist.history
    out = [[round(float(np.asarray(s))), round(float(np.asarray(c)))]
           for s, c in zip(h["sum"], h["count"])]
    from keras_bigarray import tf_data
    spec = tf_data.element_spec(ds)
    if source == "npy-direct":
        took = tf_data._windowed(ds, spec, 2) is not None
    else:
        took = tf_data._mapped_tensors(ds, spec) is not None
    print(json.dumps({"replicas": strategy.num_replicas_in_sync, "epochs": out,
                      "gathered": took}))
    """
)


@pytest.mark.parametrize("source", ["memory", "npy", "npy-direct"])
@pytest.mark.parametrize(
    "how,n,batch",
    [("dataset", 70, 16), ("to_tf_dataset", 70, 16), ("distribute_dataset", 64, 16)],
)
def test_mirrored_strategy_trains_every_row_once(how, n, batch, source):
    result = run_tf_script(SCRIPT, how, str(n), str(batch), source)
    assert result["replicas"] == 2
    assert result["gathered"]  # the tf.gather path this source is for
    want = [n * (n - 1) // 2, n]
    for total, count in result["epochs"]:
        assert [total, count] == want
