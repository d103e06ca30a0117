"""Exiting with a tf.data iteration unfinished: TensorFlow's threads call into
Python (per-batch reads, row indices, the epoch's tensors), and a call still in
flight as the interpreter finalizes used to hang the exit for good. At exit,
new calls fail at once and the calls in flight finish."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import keras_bigarray as kb
from keras_bigarray.reading import BatchReader

tf = pytest.importorskip("tensorflow")
from keras_bigarray import tf_data  # noqa: E402  (imports TensorFlow)


def test_exit_waits_for_calls_in_flight_and_refuses_new_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tf_data, "_exiting", False)
    path = tmp_path / "x.npy"
    np.save(path, np.arange(64 * 4, dtype=np.float32).reshape(64, 4))
    # pad_remainder: the per-batch reads, one Python call a batch.
    ds = kb.BigArrayDataset(path, batch_size=4, pad_remainder=True, max_queue_size=1)
    entered, release = threading.Event(), threading.Event()
    real = BatchReader.read

    def held_read(self: BatchReader, epoch: int, index: int):
        if index >= 2:
            entered.set()
            release.wait(60)
        return real(self, epoch, index)

    monkeypatch.setattr(BatchReader, "read", held_read)
    it = iter(ds.to_tf_dataset())
    next(it)
    assert entered.wait(60), "the pipeline never read ahead"

    drained: list[bool] = []
    exiting = threading.Thread(target=lambda: drained.append(tf_data._drain_at_exit()))
    exiting.start()
    exiting.join(0.5)
    assert exiting.is_alive(), "the exit did not wait for the read in flight"
    release.set()
    exiting.join(60)
    assert drained == [True]
    with pytest.raises(Exception, match="interpreter is exiting"):
        for _ in range(16):  # past the batches read before the exit began
            next(it)
    del it


EXIT_SCRIPT = """
import json, os, sys
import keras_bigarray as kb
path, pad = sys.argv[1], sys.argv[2] == "pad"
fd = os.open(path, os.O_RDONLY)
os.fdatasync(fd)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # cold: reads take a while
os.close(fd)
ds = kb.BigArrayDataset(path, batch_size=256, pad_remainder=pad)
it = iter(ds.to_tf_dataset())
for _ in range(3):
    next(it)
print(json.dumps({"left": True}), flush=True)
"""


@pytest.mark.parametrize("how", ["pad", "gather"])
def test_a_script_that_leaves_an_epoch_unfinished_exits(tmp_path: Path, how: str):
    # Reads of a file just dropped from the page cache are still in flight as
    # the script ends (where the file system keeps no page cache, e.g. tmpfs,
    # they are quick and this passes trivially). Before the fix, the per-batch
    # reads' exit hung here (a 32 MiB file hung 1 exit in 3, 256 MiB 3 in 3).
    path = tmp_path / "x.npy"
    x = np.lib.format.open_memmap(path, "w+", np.float32, (65536, 256))
    x[:] = np.arange(65536, dtype=np.float32)[:, None]
    x.flush()
    del x
    proc = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT, str(path), how],
        capture_output=True,
        text=True,
        timeout=120,  # a hang fails here
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert '"left": true' in proc.stdout
