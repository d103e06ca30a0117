"""The benchmark suite and `keras-bigarray bench` run end to end on tiny data and
report every section; no timing is asserted (the machine may be busy)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from keras_bigarray import cli
from keras_bigarray.bench import MODES, run_bench

REPO = Path(__file__).resolve().parent.parent
RUN = REPO / "benchmarks" / "run.py"

SECTIONS = [
    "## Machine",
    "## DESIGN.md targets",
    "### Pipeline alone, .npy in the page cache",
    "### HDF5, chunked uncompressed",
    "### HDF5, chunked gzip",
    "### model.fit end to end, steps_per_execution=1",
    "### model.fit end to end, steps_per_execution=32",
    "### Peak anonymous memory of model.fit",
    "### GPU: device prefetch against data already on the device",
    "### Larger than RAM: one epoch with block shuffle",
]


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow")
    return subprocess.run(
        [sys.executable, str(RUN), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_quick_run_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "report" / "RESULTS.md"
    proc = _run(
        ["--quick", "--out", str(out), "--data-dir", str(tmp_path / "data")], 300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = out.read_text()
    for section in SECTIONS:
        assert section in md, f"{section!r} missing from RESULTS.md"
    assert "--quick" in md  # the exact command
    assert "CPU:" in md and "RAM:" in md and "Disk" in md and "tensorflow" in md
    # Every case but the skipped ones measured all its variants.
    report = json.loads((tmp_path / "report" / "RESULTS.json").read_text())
    for key, case in report["cases"].items():
        if case["skipped"] or case["table"] is not None:
            continue
        for v in case["variants"]:
            assert v["error"] is None and v["measurements"], (
                key,
                v["name"],
                v["error"],
            )
    memory = report["cases"]["memory"]["table"]
    assert {r["key"] for r in memory if "growth" in r} == {"ours", "keras"}
    assert report["cases"]["huge"]["skipped"].startswith("not run")
    statuses = {t["target"]: t["status"] for t in report["targets"]}
    assert statuses["Pipeline, sequential >= 80% of a numpy copy"] in ("PASS", "MISS")
    assert "PASS" in proc.stdout or "MISS" in proc.stdout  # the targets printed
    png = (tmp_path / "report" / "RESULTS.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    assert "RESULTS.png" in md


def test_huge_path_on_a_small_file(tmp_path: Path) -> None:
    # --huge-size makes a file far below RAM: it exercises the code path only.
    out = tmp_path / "RESULTS.md"
    proc = _run(
        [
            "--cases",
            "huge",
            "--huge",
            "--huge-size",
            "4MiB",
            "--out",
            str(out),
            "--data-dir",
            str(tmp_path / "data"),
        ],
        300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "RESULTS.json").read_text())
    huge = report["cases"]["huge"]
    assert huge["skipped"] is None
    assert [v["key"] for v in huge["variants"] if v["measurements"]] == [
        "step",
        "ram_fit",
        "disk",
        "disk_blocks",
        "pipeline_block",
        "fit_block",
    ]
    text = out.read_text()
    assert "NOT larger than RAM" in text
    assert "Peak anonymous memory (sampled RssAnon) of ours grew" in text


def test_data_dir_inside_the_repo_is_refused(tmp_path: Path) -> None:
    proc = _run(
        [
            "--quick",
            "--out",
            str(tmp_path / "R.md"),
            "--data-dir",
            str(REPO / "benchmarks" / "data"),
        ],
        120,
    )
    assert proc.returncode == 2
    assert "inside the repository" in proc.stderr
    assert not (REPO / "benchmarks" / "data").exists()


# ---- keras-bigarray bench ------------------------------------------------------------


def _table_lines(text: str) -> dict[str, str]:
    """The result table's rows, by shuffle mode."""
    rows = {}
    for line in text.splitlines():
        words = line.split()
        if words and words[0] in MODES:
            rows[words[0]] = line
    return rows


def test_cli_bench_npy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "x.npy"
    np.save(path, np.arange(3000 * 16, dtype=np.float32).reshape(3000, 16))
    assert cli.main(["bench", str(path), "--batch-size", "256", "--batches", "5"]) == 0
    out, err = capsys.readouterr()
    assert "3,000 rows" in out and "batch 256" in out
    assert "vs sequential" in out
    rows = _table_lines(out)
    assert set(rows) == set(MODES)
    assert rows["sequential"].split()[1] == "5"  # batches read
    assert rows["sequential"].endswith("1.00x")
    assert "global" in err  # the progress, on stderr


def test_cli_bench_hdf5(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "d.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset(
            "images",
            data=np.ones((700, 8, 8), np.uint8),
            chunks=(50, 8, 8),
            compression="gzip",
        )
        f.create_dataset("labels", data=np.zeros(700, np.int32))
    assert cli.main(["bench", str(path), "--key", "images", "--batches", "3"]) == 0
    out, _ = capsys.readouterr()
    assert "[images]" in out
    assert set(_table_lines(out)) == set(MODES)
    # Several datasets and no --key: one clear error naming them.
    assert cli.main(["bench", str(path)]) == 2
    err = capsys.readouterr().err
    assert "images" in err and "labels" in err and "key" in err


def test_cli_bench_missing_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["bench", str(tmp_path / "nope.npy")]) == 2
    assert "nope.npy" in capsys.readouterr().err


def test_run_bench_threads_and_time_limit() -> None:
    x = np.arange(4096 * 4, dtype=np.float32).reshape(4096, 4)
    rows, notes = run_bench(x, batch_size=128, batches=10, workers=2)
    assert [r.mode for r in rows] == list(MODES)
    assert all(r.batches == 10 and r.rows == 1280 for r in rows)
    spent = [r.seconds for r in rows]
    assert all(s > 0 for s in spent)
    assert notes == []
    # A tiny time budget still reads one batch per mode.
    rows, _ = run_bench(x, batch_size=128, batches=10, seconds=1e-9)
    assert all(r.batches == 1 for r in rows)


def test_the_gpu_case_runs_on_the_cpu_device(tmp_path: Path) -> None:
    # CI has no GPU: the case's code runs on /cpu:0 instead, so a machine that
    # has one does not meet it for the first time.
    out = tmp_path / "RESULTS.md"
    args = ["--quick", "--cases", "gpu", "--gpu-device", "/cpu:0"]
    proc = _run([*args, "--out", str(out), "--data-dir", str(tmp_path / "d")], 300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    case = json.loads(out.with_suffix(".json").read_text())["cases"]["gpu"]
    assert not case["skipped"]
    assert "/cpu:0 (--gpu-device)" in case["description"]
    assert [v["key"] for v in case["variants"]] == ["on_device", "ours_device"]
    for v in case["variants"]:
        assert not v["error"] and v["measurements"], v
    assert "GPU: step time within 5%" in out.read_text()
