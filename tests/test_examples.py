"""Each script in examples/ runs as written, in its own process, on a few rows."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# Rows small enough for seconds per script, large enough for a validation split
# and a few batches; and what each script must say it did.
CASES = {
    "quickstart_npy.py": (
        ["--rows", "3000", "--epochs", "1"],
        ["wrote", "evaluate:", "predict: 3000 scores"],
    ),
    "hdf5_workers.py": (
        ["--rows", "3000", "--epochs", "1"],
        ["gzip", "read by 2 processes", "evaluate:"],
    ),
    "shards_folder.py": (
        ["--rows", "3000", "--epochs", "1"],
        ["opened 12 shards", "predict: 3000 rows"],
    ),
    "custom_train_step.py": (
        ["--rows", "3000", "--epochs", "1"],
        ["normalization:", "evaluate:", "predict: 300 rows"],
    ),
    "tf_data.py": (
        ["--rows", "3000", "--epochs", "1"],
        ["a batch is on", "MirroredStrategy over 2 replicas", "distribute_dataset"],
    ),
    "multi_worker.py": (
        ["--rows", "3000", "--epochs", "2"],
        [
            "worker 1: 24 steps",
            "rows trained per epoch, summed over workers: [3000, 3000]",
        ],
    ),
}


def test_every_example_is_tested() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_example_runs(name: str, tmp_path: Path) -> None:
    args, expected = CASES[name]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TMPDIR=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,  # the scripts must not depend on the working directory
        timeout=300,
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
    for text in expected:
        assert text in proc.stdout, f"{name}: {text!r} not in:\n{proc.stdout}"
    assert "Traceback" not in proc.stderr, proc.stderr
    assert not list(tmp_path.iterdir()), "the script left files behind"
