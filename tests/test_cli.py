"""The `keras-bigarray` command (demo, inspect, errors) and the memory sampler
behind the demo's numbers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from keras_bigarray import _memory, cli, demo


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# ---- sizes and memory -------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2MB", 2_000_000),
        ("1GB", 10**9),
        ("30gb", 30 * 10**9),
        ("200M", 200 * 10**6),
        ("1.5GiB", 3 << 29),
        ("512KiB", 512 << 10),
        ("4096", 4096),
        (" 10 kb ", 10_000),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert cli.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "1XB", "-5MB", "0", "1e3MB"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(Exception, match="invalid size"):
        cli.parse_size(text)


@pytest.mark.parametrize(
    "n, text",
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.00 KiB"),
        (1536, "1.50 KiB"),
        (1048575, "1.00 MiB"),  # rounds up into the next unit, not "1024 KiB"
        (10 << 20, "10.0 MiB"),
        (300 << 30, "300 GiB"),
        (-2048, "-2.00 KiB"),
        (None, "unknown"),
    ],
)
def test_format_bytes(n: int | None, text: str) -> None:
    assert _memory.format_bytes(n) == text


def test_peak_memory_sees_a_short_lived_allocation() -> None:
    if _memory.anon_rss() is None:
        pytest.skip("no /proc/self/status RssAnon here")
    with _memory.PeakMemory(interval=0.005) as mem:
        a = np.ones(64 << 17)  # 64 MiB of float64, touched
        time.sleep(0.1)
        del a
    assert mem.source == "RssAnon"
    assert mem.samples >= 3
    assert mem.baseline > 0
    assert 48 << 20 <= mem.growth <= mem.peak - mem.baseline + 1
    assert "growth=" in repr(mem)


def test_peak_memory_does_not_count_memmapped_pages(tmp_path: Path) -> None:
    if _memory.anon_rss() is None:
        pytest.skip("no /proc/self/status RssAnon here")
    p = tmp_path / "x.npy"
    np.save(p, np.ones(32 << 17))  # 32 MiB
    with _memory.PeakMemory(interval=0.005) as mem:
        m = np.load(p, mmap_mode="r")
        assert float(m.sum()) == 32 << 17  # every page read, file-backed
        del m
    assert mem.growth < 16 << 20


def test_peak_memory_falls_back_to_maxrss(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_memory, "anon_rss", lambda: None)
    with _memory.PeakMemory() as mem:
        pass
    assert mem.source == "ru_maxrss"
    assert mem.peak > 0 and mem.growth >= 0


def test_peak_memory_rejects_bad_interval() -> None:
    with pytest.raises(ValueError, match="interval"):
        _memory.PeakMemory(interval=0)


def test_page_cache_fraction(tmp_path: Path) -> None:
    p = tmp_path / "x.bin"
    p.write_bytes(b"\1" * (1 << 20))
    frac = _memory.page_cache_fraction(p)
    if frac is None:
        pytest.skip("no mincore here")
    assert 0.0 <= frac <= 1.0
    assert _memory.page_cache_fraction(tmp_path / "missing") is None


# ---- recommendations --------------------------------------------------------------


def test_recommend_modes() -> None:
    gib = 1 << 30
    assert (
        cli.recommend(gib, 1024, compressed=True, cached=1.0, available=8 * gib)[0]
        == "block"
    )
    assert cli.recommend(gib, 1024, direct=False, available=8 * gib)[0] == "block"
    mode, why, _, _ = cli.recommend(20 * gib, 1024, cached=0.1, available=8 * gib)
    assert mode == "block" and "larger than" in why
    mode, why, _, _ = cli.recommend(gib, 1024, cached=1.0, available=8 * gib)
    assert mode == "global" and "page cache" in why
    assert cli.recommend(gib, 1024, cached=0.0, available=8 * gib)[0] == "global"
    assert cli.recommend(6 * gib, 1024, cached=0.0, available=8 * gib)[0] == "block"
    assert cli.recommend(gib, 1024)[0] == "global"  # nothing known: fits


def test_recommend_batch_size() -> None:
    assert cli.recommend(1 << 30, 1024)[2] == 1024
    assert cli.recommend(1 << 30, 224 * 224 * 3)[2] == 32  # 150 KB images
    assert cli.recommend(1 << 30, 64 * 64 * 3)[2] == 512
    batch = cli.recommend(1 << 30, 50 << 20)[2]  # huge rows: the floor
    assert batch == 32


# ---- the demo ---------------------------------------------------------------------

_ACC = re.compile(r"([0-9.]+)% on validation \(chance ([0-9.]+)%")


def _accuracy(out: str) -> tuple[float, float]:
    m = _ACC.search(out)
    assert m, out
    return float(m.group(1)), float(m.group(2))


def test_demo_npy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # 4 MB: ~3,900 rows, enough for a validation set of ~200 rows to tell a
    # learned model from chance without doubt.
    args = [
        "demo",
        "--size",
        "4MB",
        "--dir",
        str(tmp_path),
        "--epochs",
        "4",
        "--batch-size",
        "64",
        "--verbose",
        "0",
    ]
    rc, out, err = run(capsys, *args)
    assert rc == 0, err
    assert "Writing the demo dataset" in out
    assert "rows/s" in out
    assert "peak growth during fit" in out and "anonymous memory" in out
    assert "shuffle='global'" in out
    acc, chance = _accuracy(out)
    assert acc > chance + 15, out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["npy.json", "x.npy", "y.npy"]
    x = np.load(tmp_path / "x.npy", mmap_mode="r")
    y = np.load(tmp_path / "y.npy", mmap_mode="r")
    assert x.shape == (4_000_000 // demo.ROW_NBYTES, 256) and x.dtype == np.float32
    assert y.shape == x.shape[:1] and y.dtype == np.int32
    assert set(np.unique(y)) <= set(range(10)) and len(np.unique(y)) == 10

    # Same parameters: the files are reused, not rewritten.
    mtime = (tmp_path / "x.npy").stat().st_mtime_ns
    rc, out, err = run(capsys, *args[:-4], "--epochs", "1", "--verbose", "0")
    assert rc == 0, err
    assert "Reusing the demo dataset" in out and "reused" in out
    assert (tmp_path / "x.npy").stat().st_mtime_ns == mtime


def test_demo_h5_block(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(
        capsys,
        "demo",
        "--size",
        "4MB",
        "--dir",
        str(tmp_path),
        "--format",
        "h5",
        "--epochs",
        "5",
        "--batch-size",
        "128",
        "--verbose",
        "2",
    )
    assert rc == 0, err
    assert "shuffle='block'" in out  # h5's default
    assert "Epoch 5/5" in out  # fit's own lines went to the same output
    assert "rows/s" in out and "peak growth during fit" in out
    acc, chance = _accuracy(out)
    assert acc > chance + 15, out
    with h5py.File(tmp_path / "data.h5", "r") as f:
        assert f["x"].shape[1:] == (256,) and f["x"].chunks[0] <= demo.H5_CHUNK_ROWS
        assert f["y"].shape == f["x"].shape[:1]


def test_write_dataset_streams_in_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 1000-row chunks: writing 20 MB must cost about one chunk of memory, and
    # both formats hold the same rows (each chunk has its own seed).
    monkeypatch.setattr(demo, "WRITE_CHUNK_ROWS", 1000)
    with _memory.PeakMemory(interval=0.005) as mem:
        npy = demo.write_dataset(tmp_path / "a", 20_000_000, "npy", seed=3)
    h5 = demo.write_dataset(tmp_path / "b", 20_000_000, "h5", seed=3)
    if mem.source == "RssAnon":
        assert mem.growth < 12 << 20, _memory.format_bytes(mem.growth)
    assert not npy.reused and npy.rows == h5.rows == 20_000_000 // demo.ROW_NBYTES
    xa, ya = npy.open()
    xb, yb = h5.open()
    np.testing.assert_array_equal(xa[::997], xb[::997])
    np.testing.assert_array_equal(ya[:], yb[:])
    assert not list(tmp_path.rglob("*.partial"))
    again = demo.write_dataset(tmp_path / "a", 20_000_000, "npy", seed=3)
    assert again.reused
    other = demo.write_dataset(tmp_path / "a", 20_000_000, "npy", seed=4)
    assert not other.reused  # another seed: rewritten


def test_demo_default_shuffle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def data(fmt: str, nbytes: int) -> demo.DemoData:
        return demo.DemoData(tmp_path, fmt, 1000, "x", "y", nbytes=nbytes)

    monkeypatch.setattr(demo, "available_memory", lambda: 8 << 30)
    assert demo._default_shuffle(data("npy", 1 << 30), sys.stdout) == "global"
    assert demo._default_shuffle(data("h5", 1 << 30), sys.stdout) == "block"
    assert capsys.readouterr().out == ""
    # Larger than the page cache can keep: block, and the demo says why.
    assert demo._default_shuffle(data("npy", 30 << 30), sys.stdout) == "block"
    assert "Using shuffle='block'" in capsys.readouterr().out
    monkeypatch.setattr(demo, "available_memory", lambda: None)
    assert demo._default_shuffle(data("npy", 30 << 30), sys.stdout) == "global"


def test_demo_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "demo", "--size", "10KB", "--dir", str(tmp_path))
    assert rc == 2 and "at least 200 rows" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    rc, _, err = run(capsys, "demo", "--size", "1XB")
    assert rc == 2 and "invalid size" in err
    rc, _, err = run(capsys, "demo", "--format", "zarr")
    assert rc == 2 and "invalid choice" in err
    rc, _, err = run(capsys, "demo", "--epochs", "0")
    assert rc == 2 and "must be >= 1" in err
    rc, _, err = run(capsys)
    assert rc == 2 and "COMMAND" in err


def test_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "demo", "--help")
    assert rc == 0 and "--size" in out and "1GB" in out
    rc, out, _ = run(capsys, "inspect", "--help")
    assert rc == 0 and "--key" in out
    rc, out, _ = run(capsys, "--version")
    assert rc == 0 and "keras-bigarray" in out


# ---- inspect ------------------------------------------------------------------------


def _field(out: str, name: str) -> str:
    m = re.search(rf"^  {re.escape(name)}\s+(.*)$", out, re.M)
    assert m, f"no {name!r} line in:\n{out}"
    return m.group(1)


def test_inspect_npy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "x.npy"
    np.save(p, np.zeros((1000, 28, 28), np.uint8))
    rc, out, err = run(capsys, "inspect", str(p))
    assert rc == 0, err
    assert _field(out, "shape") == "(1000, 28, 28)"
    assert _field(out, "dtype") == "uint8"
    assert _field(out, "format").startswith(".npy")
    assert _field(out, "row").startswith("784 B")
    assert _field(out, "size").startswith("766 KiB (784,000 bytes)")
    assert _field(out, "block rows").startswith("1,337 ")  # 1 MiB // 784 B
    assert _field(out, "compression") == "none"
    assert _field(out, "shuffle").startswith("'global'")
    assert _field(out, "batch_size").startswith("1024:")
    assert _field(out, "tf.data").startswith("tf.gather from the file's memory map")
    assert "direct-I/O windows" in _field(out, "tf.data")


def test_inspect_raw(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "x.u8"
    np.zeros((50, 28, 28), np.uint8).tofile(p)
    # "--shape -1,28,28" as people type it (argparse alone would take
    # "-1,28,28" for an option).
    rc, out, err = run(
        capsys, "inspect", str(p), "--dtype", "uint8", "--shape", "-1,28,28"
    )
    assert rc == 0, err
    assert _field(out, "shape") == "(50, 28, 28)"
    assert _field(out, "format").startswith("raw binary")
    rc, out, err = run(
        capsys,
        "inspect",
        str(p),
        "--dtype",
        "float32",
        "--shape=-1,2",
        "--offset",
        "16",
    )
    assert rc == 0, err
    assert _field(out, "shape") == "(4898, 2)"
    rc, out, err = run(
        capsys, "inspect", str(p), "--dtype", "float64", "--shape", "-1,3"
    )
    assert rc == 2 and "not a whole number" in err
    rc, out, err = run(capsys, "inspect", str(p))
    assert rc == 2 and "--dtype" in err and "Traceback" not in err


def test_inspect_hdf5(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "data.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset(
            "train/images",
            data=np.zeros((300, 16, 16, 3), np.uint8),
            chunks=(32, 16, 16, 3),
            compression="gzip",
        )
        f.create_dataset("train/labels", data=np.arange(300))
        f.create_dataset("names", data=np.array([b"a"] * 3, dtype=h5py.string_dtype()))
    rc, out, err = run(capsys, "inspect", str(p))
    assert rc == 0, err
    assert "3 dataset(s)" in out
    assert "[train/images]" in out and "[train/labels]" in out
    images = out.split("[train/images]")[1].split("[train/labels]")[0]
    assert _field(images, "chunks") == "(32, 16, 16, 3)"
    assert _field(images, "compression") == "gzip"
    assert _field(images, "shuffle").startswith("'block': compressed")
    assert (
        _field(images, "tf.data")
        == "a Python read per batch (compressed chunks are decoded)"
    )
    labels = out.split("[train/labels]")[1]
    assert _field(labels, "chunks") == "none (contiguous)"
    assert _field(labels, "shuffle").startswith("'global'")
    assert "[names]" in out and "skipped" in out and "variable-length" in out
    assert "Together in one BigArrayDataset (x, y, ...): shuffle='block'" in out

    rc, out, err = run(capsys, "inspect", str(p), "--key", "train/labels")
    assert rc == 0, err
    assert _field(out, "shape") == "(300,)" and _field(out, "dtype") == "int64"
    rc, out, err = run(capsys, "inspect", str(p), "--key", "nope")
    assert rc == 2
    assert "'nope'" in err and "train/images" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_inspect_shards(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "shards"
    d.mkdir()
    for i, n in enumerate([100, 120, 90]):
        np.save(d / f"part-{i}.npy", np.zeros((n, 8), np.float32))
    for target in (str(d), str(d / "part-*.npy")):
        rc, out, err = run(capsys, "inspect", target)
        assert rc == 0, err
        assert _field(out, "shape") == "(310, 8)"
        assert _field(out, "format").startswith("3 shards of .npy")
        assert _field(out, "shards").startswith("3 files, 90 to 120 rows each")
        assert _field(out, "tf.data").startswith("tf.gather from one memory map")


def test_inspect_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = [
        ([str(tmp_path / "missing.npy")], "missing.npy"),
        ([str(tmp_path / "none-*.npy")], "none-*.npy"),
        ([str(tmp_path)], str(tmp_path)),  # a folder without .npy files
    ]
    np.save(tmp_path / "x.npy", np.zeros(4))
    cases.append(([str(tmp_path / "x.npy"), "--key", "k"], "not an HDF5 file"))
    (tmp_path / "short.npy").write_bytes(b"\x93NUMPY\x01\x00\x10")
    cases.append(([str(tmp_path / "short.npy")], "short.npy"))
    for argv, expected in cases:
        rc, out, err = run(capsys, "inspect", *argv)
        assert rc == 2, (argv, out, err)
        assert expected in err, (argv, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_inspect_npy_of_unknown_version(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "bad.npy").write_bytes(b"\x93NUMPY garbage")
    rc, _, err = run(capsys, "inspect", str(tmp_path / "bad.npy"))
    assert rc == 2 and "bad.npy" in err and "Traceback" not in err


def test_console_script_demo_is_quiet(tmp_path: Path) -> None:
    # The installed command, as a user runs it: exit 0, the summary on stdout,
    # nothing on stderr (TensorFlow's import-time C++ INFO lines silenced).
    script = Path(sys.executable).parent / "keras-bigarray"
    cmd = (
        [str(script)]
        if script.exists()
        else [sys.executable, "-m", "keras_bigarray.cli"]
    )
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    proc = subprocess.run(
        [*cmd, "demo", "--size", "1MB", "--epochs", "1", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "keras-bigarray demo: summary" in proc.stdout
    assert proc.stderr == ""
