"""The benchmark harness: variants of a case timed in interleaved rounds (A B C, then
B C A, ...), medians with min-max, progress on stderr, and a description of the
machine and the library versions for the report."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

_T0 = time.perf_counter()


def log(msg: str) -> None:
    """A progress line on stderr, stamped with the seconds since start."""
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


@dataclass
class Measurement:
    """One timed run: `rows` rows (`nbytes` bytes) in `seconds`."""

    seconds: float
    rows: int
    nbytes: int
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("nan")

    @property
    def mb_per_s(self) -> float:
        return self.nbytes / 1e6 / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class Variant:
    """One contender of a case.

    Args:
        key: a short identifier the targets refer to.
        name: what the report calls it.
        ours: True for keras-bigarray's paths, False for peers and limits.
        run: measures once; called with the round number.
        note: how it is measured, for the report.
        chart: a short label for the chart (default: `name`).
    """

    key: str
    name: str
    ours: bool
    run: Callable[[int], Measurement]
    note: str = ""
    chart: str = ""


@dataclass
class VariantResult:
    key: str
    name: str
    ours: bool
    note: str
    chart: str
    measurements: list[Measurement] = field(default_factory=list)
    error: str | None = None

    def rates(self, unit: str) -> list[float]:
        if unit == "MB/s":
            return [m.mb_per_s for m in self.measurements]
        return [m.rows_per_s for m in self.measurements]

    def median(self, unit: str) -> float:
        r = self.rates(unit)
        return statistics.median(r) if r else float("nan")

    def span(self, unit: str) -> tuple[float, float]:
        r = self.rates(unit)
        return (min(r), max(r)) if r else (float("nan"), float("nan"))

    def extra_median(self, name: str) -> float | None:
        vals = [m.extra[name] for m in self.measurements if name in m.extra]
        return statistics.median(vals) if vals else None


@dataclass
class CaseResult:
    """The results of one case, in the order its variants were declared."""

    key: str
    title: str
    unit: str  # "MB/s" or "rows/s"
    description: str
    variants: list[VariantResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None
    table: list[dict[str, Any]] | None = None  # a free-form table (memory)

    def get(self, key: str) -> VariantResult | None:
        for v in self.variants:
            if v.key == key:
                return v
        return None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def interleave(
    case: CaseResult,
    variants: list[Variant],
    repeats: int,
    *,
    unit: str | None = None,
) -> CaseResult:
    """Runs every variant `repeats` times in rotating order; fills `case`.

    Round r runs the variants starting from the r-th, so none is always first
    after a pause or always last before one. A variant that raises is recorded
    with its error and left out of later rounds.
    """
    unit = unit or case.unit
    results = [
        VariantResult(v.key, v.name, v.ours, v.note, v.chart or v.name)
        for v in variants
    ]
    case.variants = results
    n = len(variants)
    for r in range(repeats):
        for j in range(n):
            k = (r + j) % n
            v, res = variants[k], results[k]
            if res.error is not None:
                continue
            try:
                m = v.run(r)
            except Exception as e:  # noqa: BLE001 - a benchmark reports, never stops
                res.error = f"{type(e).__name__}: {e}"
                log(f"  {case.key} | {v.name}: FAILED {res.error}")
                continue
            res.measurements.append(m)
            rate = m.mb_per_s if unit == "MB/s" else m.rows_per_s
            log(
                f"  {case.key} round {r + 1}/{repeats} | {v.name}: "
                f"{fmt_rate(rate, unit)} ({m.seconds:.2f} s)"
            )
    return case


def fmt_rate(value: float, unit: str) -> str:
    if value != value:  # nan
        return "n/a"
    if unit == "rows/s":
        if value >= 1e6:
            return f"{value / 1e6:.2f}M rows/s"
        return f"{value / 1e3:.0f}k rows/s"
    if value >= 100:
        return f"{value:,.0f} MB/s"
    if value >= 10:
        return f"{value:.1f} MB/s"
    return f"{value:.2f} MB/s"


def timed(fn: Callable[[], tuple[int, int]]) -> Measurement:
    """Times `fn() -> (rows, nbytes)`."""
    t0 = time.perf_counter()
    rows, nbytes = fn()
    return Measurement(time.perf_counter() - t0, rows, nbytes)


# ---- the machine and the versions ----------------------------------------------------


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def cpu_model() -> str:
    info = _read("/proc/cpuinfo") or ""
    for line in info.splitlines():
        if line.lower().startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def disk_of(path: str) -> str:
    """The file system and block device holding `path`, as far as Linux tells."""
    path = os.path.realpath(path)
    best = ("", "", "")
    for line in (_read("/proc/mounts") or "").splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        dev, mnt, fs = parts[0], parts[1].replace("\\040", " "), parts[2]
        if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(
            best[1]
        ):
            best = (dev, mnt, fs)
    dev, mnt, fs = best
    bits = [f"{fs} on {dev} (mounted at {mnt})" if dev else "unknown file system"]
    name = os.path.basename(dev)
    if name:
        base = (
            name.rstrip("0123456789")
            if not name.startswith("nvme")
            else name.split("p")[0]
        )
        rot = _read(f"/sys/block/{base}/queue/rotational")
        model = _read(f"/sys/block/{base}/device/model")
        if model:
            bits.append(model.strip())
        if rot is not None:
            bits.append(
                "rotational" if rot.strip() == "1" else "non-rotational (SSD/NVMe)"
            )
            if base.startswith("vd"):
                bits.append("virtio disk of a VM: the host decides the real medium")
    try:
        import shutil

        du = shutil.disk_usage(path)
        bits.append(f"{du.free / 1e9:.0f} GB free of {du.total / 1e9:.0f} GB")
    except OSError:
        pass
    return ", ".join(bits)


def _version(mod: str) -> str:
    try:
        m = __import__(mod)
        return str(getattr(m, "__version__", "?"))
    except Exception:  # noqa: BLE001
        return "not installed"


def _hdf5_version() -> str:
    try:
        import h5py

        return str(h5py.version.hdf5_version)
    except Exception:  # noqa: BLE001
        return "?"


def git_commit(repo: str) -> str:
    try:
        out = subprocess.run(
            ["git", "-C", repo, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return out + (" (with uncommitted changes)" if dirty else "")
    except Exception:  # noqa: BLE001
        return "unknown"


def machine_info(data_dir: str, repo: str) -> dict[str, Any]:
    from keras_bigarray._memory import available_memory, total_memory

    total = total_memory()
    avail = available_memory()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "ram": f"{total / 2**30:.1f} GiB" if total else "unknown",
        "ram_available_at_start": f"{avail / 2**30:.1f} GiB" if avail else "unknown",
        "disk": disk_of(data_dir),
        "os": f"{platform.system()} {platform.release()} ({platform.machine()})",
        "python": platform.python_version(),
        "load_average_at_start": (
            " / ".join(f"{x:.2f}" for x in load) + " (1, 5, 15 min)"
            if load
            else "unknown"
        ),
        "versions": {
            "keras-bigarray": _version("keras_bigarray") + f", git {git_commit(repo)}",
            "numpy": _version("numpy"),
            "h5py": _version("h5py") + f" (HDF5 {_hdf5_version()})",
            "keras": _version("keras"),
            "tensorflow": _version("tensorflow"),
        },
    }
