"""The report: DESIGN.md's performance targets as ratios of measured medians with
PASS/MISS, the Markdown of RESULTS.md, and the chart's panels."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from _chart import Bar, Panel
from _harness import CaseResult, VariantResult, fmt_rate

Results = dict[str, CaseResult]


@dataclass
class TargetResult:
    target: str
    measured: str
    ratio: float | None
    needed: str
    status: str  # PASS, MISS, or why it was not measured
    limit: float | None = None  # the same ratio for the bare limit, if measured


def _med(
    results: Results, case: str, key: str
) -> tuple[float | None, VariantResult | None]:
    c = results.get(case)
    if c is None or c.skipped:
        return None, None
    v = c.get(key)
    if v is None or not v.measurements:
        return None, v
    return v.median(c.unit), v


def _ratio_target(
    target: str,
    case: str,
    num: str,
    den: str | list[str],
    need: float,
    *,
    more: bool = False,
    limit: str | None = None,
) -> Callable[[Results], TargetResult]:
    """`median(num) / median(den) >= need` (or `> need` with `more`).

    With a list for `den`, the best of them is the reference. `limit` names a
    variant doing the bare work of `num` (no pipeline): its ratio to `den` is
    the best any pipeline could reach on this machine.
    """

    def check(results: Results) -> TargetResult:
        needed = f"{'>' if more else '>='} {need:.3g}x"
        c = results.get(case)
        if c is None:
            return TargetResult(target, "", None, needed, "not run")
        if c.skipped:
            return TargetResult(target, "", None, needed, f"skipped: {c.skipped}")
        n, nv = _med(results, case, num)
        dens = [den] if isinstance(den, str) else den
        best = None
        for d in dens:
            dv, dvar = _med(results, case, d)
            if dv is not None and (best is None or dv > best[0]):
                best = (dv, dvar)
        if n is None or best is None or not best[0]:
            return TargetResult(
                target, "", None, needed, "not measured (a variant failed)"
            )
        ratio = n / best[0]
        measured = (
            f"{fmt_rate(n, c.unit)} vs {fmt_rate(best[0], c.unit)} "
            f"({best[1].name if best[1] else ''})"
        )
        ok = ratio > need if more else ratio >= need
        lim = _med(results, case, limit)[0] if limit else None
        return TargetResult(
            target,
            measured,
            ratio,
            needed,
            "PASS" if ok else "MISS",
            lim / best[0] if lim else None,
        )

    return check


def _memory_target(results: Results) -> TargetResult:
    from keras_bigarray._memory import format_bytes

    target = "Peak memory: growth the same for 2 GB and 8 GB, bounded by the queue"
    needed = "same (+25% +32 MiB), < 5% of array"
    c = results.get("memory")
    if c is None:
        return TargetResult(target, "", None, needed, "not run")
    if c.skipped:
        return TargetResult(target, "", None, needed, f"skipped: {c.skipped}")
    ours = [r for r in (c.table or []) if r["key"] == "ours" and "growth" in r]
    if len({r["size"] for r in ours}) < 2:
        return TargetResult(target, "", None, needed, "not measured")
    by_size: dict[int, list[int]] = {}
    for r in ours:
        by_size.setdefault(r["size"], []).append(r["growth"])
    small, big = min(by_size), max(by_size)
    g_small, g_big = max(by_size[small]), max(by_size[big])
    keras = [r for r in (c.table or []) if r["key"] == "keras" and "growth" in r]
    peer = ""
    if keras:
        k = max(keras, key=lambda r: r["size"])
        peer = (
            f"; model.fit(memmap): {format_bytes(k['growth'])} at "
            f"{format_bytes(k['size'])} ({k['growth'] / k['size']:.1f}x the array)"
        )
    ratio = g_big / g_small if g_small else None
    ok = g_big <= 1.25 * g_small + (32 << 20) and g_big < 0.05 * big
    measured = (
        f"ours: {format_bytes(g_small)} at {format_bytes(small)}, "
        f"{format_bytes(g_big)} at {format_bytes(big)}{peer}"
    )
    return TargetResult(target, measured, ratio, needed, "PASS" if ok else "MISS")


def _gpu_target(results: Results) -> TargetResult:
    return _ratio_target(
        "GPU: step time within 5% of data already on the device",
        "gpu",
        "ours_device",
        "on_device",
        1 / 1.05,
    )(results)


TARGETS: list[Callable[[Results], TargetResult]] = [
    _ratio_target(
        "Pipeline, sequential >= 80% of a numpy copy",
        "pipeline",
        "reader_sequential",
        "copy",
        0.8,
    ),
    _ratio_target(
        "Pipeline, global shuffle >= 90% of np.take (same indices)",
        "pipeline",
        "reader_global",
        "take_global",
        0.9,
    ),
    _ratio_target(
        "Pipeline, block shuffle >= 90% of np.take (global indices)",
        "pipeline",
        "reader_block",
        "take_global",
        0.9,
        limit="take_block",
    ),
    _ratio_target(
        "HDF5 uncompressed, block >= 70% of h5py slicing",
        "hdf5_uncompressed",
        "reader_block",
        "h5py_seq",
        0.7,
        limit="gather_block",
    ),
    _ratio_target(
        "HDF5 uncompressed, global >= 20x h5py fancy indexing",
        "hdf5_uncompressed",
        "reader_global",
        "h5py_fancy",
        20,
    ),
    _ratio_target(
        "HDF5 gzip, block (chunk-aligned) >= 50% of h5py slicing",
        "hdf5_gzip",
        "reader_block",
        "h5py_seq",
        0.5,
    ),
]
for _spe in (1, 32):
    TARGETS += [
        _ratio_target(
            f"fit spe={_spe}: fit(ds) >= 0.9x the pure step",
            f"fit_spe{_spe}",
            "ours_ds",
            "step",
            0.9,
            limit="ram_gather",
        ),
        _ratio_target(
            f"fit spe={_spe}: fit(ds.to_tf_dataset()) >= 0.9x the pure step",
            f"fit_spe{_spe}",
            "ours_tf",
            "step",
            0.9,
            limit="ram_gather",
        ),
        _ratio_target(
            f"fit spe={_spe}: fit(ds) ahead of every peer",
            f"fit_spe{_spe}",
            "ours_ds",
            ["memmap", "pydataset", "recipe"],
            1.0,
            more=True,
            limit="ram_gather",
        ),
    ]
TARGETS += [
    _memory_target,
    _ratio_target(
        "Larger than RAM: fit one epoch, block >= 70% of disk sequential read",
        "huge",
        "fit_block",
        "disk",
        0.7,
        limit="ram_fit",
    ),
    _ratio_target(
        "Larger than RAM: pipeline alone, block >= 70% of disk sequential read",
        "huge",
        "pipeline_block",
        "disk",
        0.7,
        limit="disk_blocks",
    ),
    _gpu_target,
]


def evaluate(results: Results) -> list[TargetResult]:
    return [t(results) for t in TARGETS]


# ---- Markdown ------------------------------------------------------------------------

# Which limit each variant is compared with in its case's table.
_REFERENCE = {
    "pipeline": lambda k: (
        "copy"
        if k.endswith("sequential") or k == "copy"
        else ("take_block" if k == "take_block" else "take_global")
    ),
    "hdf5_uncompressed": lambda k: "h5py_seq",
    "hdf5_gzip": lambda k: "h5py_seq",
    "fit_spe1": lambda k: "step",
    "fit_spe32": lambda k: "step",
    "gpu": lambda k: "on_device",
    "huge": lambda k: "disk",
}


def _esc(s: str) -> str:
    return s.replace("|", "\\|")


def case_markdown(c: CaseResult) -> list[str]:
    from keras_bigarray._memory import format_bytes

    out = [f"### {c.title}", ""]
    if c.skipped:
        out += [f"Skipped: {c.skipped}.", ""]
        if c.description:
            out += [c.description, ""]
        return out
    out += [c.description, ""]
    if c.table is not None:  # memory
        out += [
            "| variant | array | baseline RssAnon | peak RssAnon | growth "
            "| growth / array | fit wall time |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in c.table:
            size = f"{format_bytes(r['size'])} ({r['size'] / 1e9:.1f} GB)"
            if "growth" in r:
                out.append(
                    f"| {r['variant']} | {size} | {format_bytes(r['baseline'])} | "
                    f"{format_bytes(r['peak'])} | **{format_bytes(r['growth'])}** | "
                    f"{r['growth'] / r['size']:.2f}x | {r['seconds']:.1f} s |"
                )
            else:
                why = r.get("skipped") or r.get("error") or "not run"
                out.append(
                    f"| {r['variant']} | {size} | | | not run: {_esc(why)} | | |"
                )
        out += [""]
    else:
        ref_of = _REFERENCE.get(c.key, lambda k: c.variants[0].key)
        extra = any(v.extra_median("first_epoch_s") is not None for v in c.variants)
        cpu = any(v.extra_median("cpu_cores") is not None for v in c.variants)
        head = f"| variant | median {c.unit} | min - max | vs limit |"
        rule = "|---|---:|---:|---:|"
        if extra:
            head += " first epoch |"
            rule += "---:|"
        if cpu:
            head += " CPU busy |"
            rule += "---:|"
        out += [head + " how |", rule + "---|"]
        for v in c.variants:
            name = f"**{v.name}**" if v.ours else v.name
            if not v.measurements:
                out.append(f"| {name} | failed | | | {_esc(v.error or '')} |")
                continue
            med = v.median(c.unit)
            lo, hi = v.span(c.unit)
            ref = c.get(ref_of(v.key))
            vs = ""
            if ref is not None and ref.measurements and ref.key != v.key:
                vs = f"{med / ref.median(c.unit):.2f}x"
            row = (
                f"| {name} | {fmt_rate(med, c.unit)} | {fmt_rate(lo, c.unit)} - "
                f"{fmt_rate(hi, c.unit)} | {vs} |"
            )
            if extra:
                fe = v.extra_median("first_epoch_s")
                row += f" {fe:.1f} s |" if fe is not None else " |"
            if cpu:
                busy = v.extra_median("cpu_cores")
                row += f" {busy:.2f} cores |" if busy is not None else " |"
            n = len(v.measurements)
            how = _esc(v.note) + f" ({n} run{'s' if n != 1 else ''}"
            batches = v.extra_median("batches")
            how += f", {batches:.0f} batches a run)" if batches is not None else ")"
            out.append(row + f" {how} |")
        out += [""]
    for note in c.notes:
        out += [note, ""]
    return out


def panels(results: Results) -> list[Panel]:
    from keras_bigarray._memory import format_bytes

    ps: list[Panel] = []
    for c in results.values():
        if c.skipped:
            continue
        if c.table is not None:
            bars = []
            for r in c.table:
                if "growth" not in r or r.get("round", 1) != 1:
                    continue
                g = r["growth"] / 2**20
                who = "OURS" if r["key"] == "ours" else "FIT(MEMMAP)"
                bars.append(
                    Bar(
                        f"{who} {format_bytes(r['size'])}",
                        g,
                        g,
                        g,
                        r["key"] == "ours",
                        format_bytes(r["growth"]),
                    )
                )
            ps.append(Panel("PEAK MEMORY GROWTH OF FIT (LOWER IS BETTER)", bars))
            continue
        bars = []
        for v in c.variants:
            if not v.measurements:
                continue
            med = v.median(c.unit)
            lo, hi = v.span(c.unit)
            bars.append(Bar(v.chart, med, lo, hi, v.ours, fmt_rate(med, c.unit)))
        ps.append(Panel(f"{c.title} ({c.unit}, higher is better)", bars))
    return ps


def results_markdown(
    results: Results,
    targets: list[TargetResult],
    machine: dict[str, Any],
    command: str,
    chart_name: str | None,
    elapsed_s: float,
    config_notes: list[str],
) -> str:
    m = machine
    lines = [
        "# keras-bigarray benchmark results",
        "",
        f"Measured {m['date']} with `{command}` in {elapsed_s / 60:.1f} minutes.",
        "",
        "## Machine",
        "",
        f"- CPU: {m['cpu']}, {m['cores']} cores",
        f"- RAM: {m['ram']} ({m['ram_available_at_start']} available at the start)",
        f"- Disk (data folder): {m['disk']}",
        f"- OS: {m['os']}, Python {m['python']}",
        f"- Load average at the start: {m['load_average_at_start']}",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
        "",
    ]
    if config_notes:
        lines += ["## Settings", ""] + [f"- {n}" for n in config_notes] + [""]
    summary = summary_markdown(results, machine)
    if summary:
        lines += ["## Summary", ""] + summary
    lines += [
        "## DESIGN.md targets",
        "",
        "Ratios of medians, measured side by side in this run. The last column, "
        "where given, is the ratio that the bare work reaches against the same "
        "reference: a plain numpy gather of the same rows, with no sampling, "
        "checks or pipeline (keras-bigarray's own gather reads each row's first "
        "byte before copying, and can beat it); for fit, TensorFlow's own "
        "gather of the same rows from tensors in RAM, with no Python and no "
        "file (on the larger-than-RAM file too: the same model fed "
        "block-shuffled rows gathered from 1 GiB in RAM, which no reader of "
        "the disk can beat); for the pipeline on that file, the disk's own "
        "rate for reads of one block at random offsets, block shuffle's "
        "access.",
        "",
        "| target | measured | ratio | needed | result | the bare limit's ratio |",
        "|---|---|---:|---|---|---:|",
    ]
    for t in targets:
        ratio = "" if t.ratio is None else f"{t.ratio:.2f}x"
        status = f"**{t.status}**" if t.status in ("PASS", "MISS") else _esc(t.status)
        lim = "" if t.limit is None else f"{t.limit:.2f}x"
        lines.append(
            f"| {_esc(t.target)} | {_esc(t.measured)} | {ratio} | {t.needed} "
            f"| {status} "
            f"| {lim} |"
        )
    lines += [""]
    if chart_name:
        lines += [f"![benchmark chart]({chart_name})", ""]
    lines += [
        "## Cases",
        "",
        "Every case runs its variants in interleaved rounds (A B C, B C A, ...); "
        "the median and the min - max over the rounds are shown. **Bold** rows "
        "are keras-bigarray; the others are what users do today and the limits "
        "(marked so) that no pipeline can beat.",
        "",
    ]
    for c in results.values():
        lines += case_markdown(c)
    return "\n".join(lines).rstrip() + "\n"


def targets_text(targets: list[TargetResult]) -> str:
    width = max(len(t.target) for t in targets)
    rows = []
    for t in targets:
        ratio = "" if t.ratio is None else f"{t.ratio:8.2f}x"
        lim = f"  (bare limit {t.limit:.2f}x)" if t.limit is not None else ""
        rows.append(
            f"  {t.target:<{width}}  {ratio:>9}  {t.needed:<10}  {t.status}{lim}"
        )
    return "\n".join(rows)


# ---- the summary (what the README shows) ---------------------------------------------


def summary_markdown(results: Results, machine: dict[str, Any]) -> list[str]:
    """A short table of the headline comparisons, for the README."""
    from keras_bigarray._memory import format_bytes

    rows: list[tuple[str, str, str, str]] = []

    def pair(case: str, ours: str, peers: list[str], label: str) -> None:
        c = results.get(case)
        if c is None or c.skipped:
            return
        o = c.get(ours)
        cands = [
            v for v in (c.get(p) for p in peers) if v is not None and v.measurements
        ]
        if o is None or not o.measurements or not cands:
            return
        best = max(cands, key=lambda v: v.median(c.unit))
        om, bm = o.median(c.unit), best.median(c.unit)
        name = best.name.split(" (")[0]
        rows.append(
            (
                label,
                fmt_rate(om, c.unit),
                f"{fmt_rate(bm, c.unit)} ({name})",
                f"{om / bm:.2f}x",
            )
        )

    pair(
        "pipeline",
        "reader_global",
        ["take_global"],
        ".npy in page cache, global shuffle, pipeline alone",
    )
    pair(
        "hdf5_uncompressed",
        "reader_global",
        ["h5py_fancy"],
        "HDF5 uncompressed, global shuffle",
    )
    pair(
        "hdf5_uncompressed",
        "reader_block",
        ["h5py_seq"],
        "HDF5 uncompressed, block shuffle",
    )
    pair("hdf5_gzip", "reader_block", ["h5py_seq"], "HDF5 gzip, block shuffle")
    for spe in (1, 32):
        pair(
            f"fit_spe{spe}",
            "ours_ds",
            ["memmap", "pydataset", "recipe"],
            f"model.fit, steps_per_execution={spe}",
        )
        pair(
            f"fit_spe{spe}",
            "ours_ds",
            ["step"],
            f"model.fit, steps_per_execution={spe}, against the pure step",
        )
    mem = results.get("memory")
    if mem is not None and mem.table:
        ours = [r for r in mem.table if r["key"] == "ours" and "growth" in r]
        keras = [r for r in mem.table if r["key"] == "keras" and "growth" in r]
        if ours and keras:
            o = max(ours, key=lambda r: r["size"])
            k = max(keras, key=lambda r: r["size"])
            rows.append(
                (
                    "peak memory growth of fit (RssAnon)",
                    f"{format_bytes(o['growth'])} for {format_bytes(o['size'])} "
                    f"({o['growth'] / o['size']:.3f}x the array)",
                    f"{format_bytes(k['growth'])} for {format_bytes(k['size'])} "
                    f"({k['growth'] / k['size']:.1f}x the array; model.fit(memmap))",
                    "",
                )
            )
    huge = results.get("huge")
    if huge is not None and not huge.skipped:
        pair(
            "huge",
            "pipeline_block",
            ["disk"],
            "larger than RAM, block shuffle, pipeline alone",
        )
        pair("huge", "fit_block", ["disk"], "larger than RAM, fit one epoch, block")
        pair(
            "huge",
            "fit_block",
            ["ram_fit"],
            "larger than RAM, fit one epoch, against fit from RAM",
        )
    if not rows:
        return []
    out = [
        f"Measured {machine['date'][:10]} on {machine['cpu']} ({machine['cores']} "
        f"cores, {machine['ram']} RAM), "
        f"TensorFlow {machine['versions']['tensorflow']}, "
        "batch 1024, rows of 1 KiB:",
        "",
        "| case | keras-bigarray | best alternative | ratio |",
        "|---|---:|---:|---:|",
    ]
    out += [f"| {a} | {b} | {_esc(c)} | {d} |" for a, b, c, d in rows]
    return out + [""]
