#!/usr/bin/env python
"""keras-bigarray's benchmark suite, one command: generates its data, runs every
case interleaved with its baselines, and writes RESULTS.md, a PNG chart and the
raw numbers as JSON.

    python benchmarks/run.py            # the default cases, ~10-15 min on 2 cores
    python benchmarks/run.py --quick    # a smoke run on tiny data, ~1 min
    python benchmarks/run.py --huge     # also a .npy larger than this machine's RAM
"""

from __future__ import annotations

import os

# Before TensorFlow is imported anywhere.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import argparse  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
if REPO not in sys.path:  # run from a clone without installing the package
    sys.path.insert(1, REPO)

CASES = ("pipeline", "hdf5", "fit", "memory", "gpu", "huge")


def _size(text: str) -> int:
    from keras_bigarray.cli import parse_size

    return parse_size(text)


def _sizes(text: str) -> tuple[int, ...]:
    return tuple(_size(t) for t in text.split(",") if t.strip())


def build_parser() -> argparse.ArgumentParser:
    from _data import default_data_dir

    p = argparse.ArgumentParser(
        prog="benchmarks/run.py",
        description=(
            "Runs keras-bigarray's benchmarks against numpy, h5py, Keras and "
            "tf.data on data it generates, and writes RESULTS.md, a PNG chart "
            "and the raw numbers as JSON."
        ),
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny data and fewer rounds: checks that every case runs (~1 min)",
    )
    p.add_argument(
        "--huge",
        action="store_true",
        help="also train on a .npy larger than this machine's RAM (writes it "
        "first: tens of GB, needs that much free disk)",
    )
    p.add_argument(
        "--out",
        default=os.path.join(HERE, "RESULTS.md"),
        help="the report; the chart and JSON go beside it as .png and .json "
        "(default: benchmarks/RESULTS.md)",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help=f"where generated data is written and reused (default: "
        f"{default_data_dir()}; never inside the repository)",
    )
    p.add_argument(
        "--cases",
        default=",".join(c for c in CASES if c != "huge"),
        help=f"comma-separated subset of {', '.join(CASES)} (default: all; "
        "huge runs only with --huge)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="rounds of the pipeline and HDF5 cases (default 5; quick 2)",
    )
    p.add_argument(
        "--fit-repeats",
        type=int,
        default=None,
        help="rounds of the fit and GPU cases (default 7; quick 1)",
    )
    p.add_argument("--memory-repeats", type=int, default=1, help="default 1")
    p.add_argument("--batch-size", type=int, default=1024, help="default 1024")
    p.add_argument(
        "--workers",
        type=int,
        default=2,
        help="reader threads of the parallel paths (default 2)",
    )
    p.add_argument(
        "--pipeline-size",
        type=_size,
        default=None,
        help="the .npy of the pipeline and fit cases (default 1GiB; quick 32MiB)",
    )
    p.add_argument(
        "--h5-size",
        type=_size,
        default=None,
        help="each HDF5 file (default 512MiB; quick 8MiB)",
    )
    p.add_argument(
        "--fit-rows",
        type=int,
        default=None,
        help="rows trained per fit epoch (default 524288; quick 32768)",
    )
    p.add_argument(
        "--memory-sizes",
        type=_sizes,
        default=None,
        help="array sizes of the memory case (default 2GB,8GB; quick 16MB,64MB)",
    )
    p.add_argument(
        "--huge-size",
        type=_size,
        default=None,
        help="size of the --huge file (default 1.25x RAM)",
    )
    p.add_argument(
        "--gpu-device",
        default=None,
        help="the GPU case's device (default: the first GPU, or the case is "
        "skipped; /cpu:0 runs the case's code on a machine without a GPU)",
    )
    p.add_argument("--child-memory", default=None, help=argparse.SUPPRESS)
    return p


def make_config(args: argparse.Namespace) -> tuple[object, list[str]]:
    from _cases import Config
    from _data import default_data_dir

    q = args.quick
    data_dir = os.path.abspath(args.data_dir or default_data_dir())
    cfg = Config(
        data_dir=data_dir,
        quick=q,
        batch_size=args.batch_size,
        repeats=args.repeats or (2 if q else 5),
        fit_repeats=args.fit_repeats or (1 if q else 7),
        memory_repeats=args.memory_repeats,
        workers=args.workers,
        pipeline_bytes=args.pipeline_size or ((32 << 20) if q else (1 << 30)),
        h5_bytes=args.h5_size or ((8 << 20) if q else (512 << 20)),
        fit_rows=args.fit_rows or (32 * 1024 if q else 512 * 1024),
        memory_bytes=args.memory_sizes
        or ((16 * 10**6, 64 * 10**6) if q else (2 * 10**9, 8 * 10**9)),
        bounded_seconds=0.3 if q else 3.0,
        min_seconds=0.0 if q else 1.0,
        huge=args.huge,
        huge_bytes=args.huge_size,
        gpu_device=args.gpu_device,
    )
    notes = [
        f"data folder: {data_dir}",
        f"batch size {cfg.batch_size}; {cfg.repeats} rounds (pipeline, HDF5), "
        f"{cfg.fit_repeats} (fit, GPU), {cfg.memory_repeats} (memory)",
        f"reader threads of the parallel paths: {cfg.workers}",
    ]
    if q:
        notes.append(
            "--quick: tiny data and few rounds, a smoke run; the ratios mean little"
        )
    return cfg, notes


def _quiet_third_party() -> None:
    # Keras warns that fit's default shuffle=True does not apply to a
    # tf.data.Dataset (the peers and our to_tf_dataset); TensorFlow warns
    # about retracing, which every fresh model of the fit case does once.
    warnings.filterwarnings("ignore", message=r".*`shuffle=True` was passed")
    # TensorFlow's C++ side prints INFO lines at import whatever
    # TF_CPP_MIN_LOG_LEVEL says: import it with stderr (fd 2) muted.
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import tensorflow as tf
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    tf.get_logger().setLevel("ERROR")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.child_memory is not None:
        from _cases import memory_child

        _quiet_third_party()
        print(json.dumps(memory_child(json.loads(args.child_memory))), flush=True)
        return 0

    _quiet_third_party()
    from _harness import log, machine_info

    cfg, notes = make_config(args)
    real_data = os.path.realpath(cfg.data_dir)
    if real_data == REPO or real_data.startswith(os.path.realpath(REPO) + os.sep):
        parser.error(
            f"--data-dir {cfg.data_dir} is inside the repository; pick a "
            "folder outside it (generated data is large)"
        )
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {', '.join(CASES)}")
    if "huge" not in cases and (args.huge or args.cases == parser.get_default("cases")):
        cases.append("huge")  # without --huge, its section says how to run it
    out = os.path.abspath(args.out)
    stem = os.path.splitext(out)[0]
    os.makedirs(os.path.dirname(out), exist_ok=True)
    os.makedirs(cfg.data_dir, exist_ok=True)

    command = (
        shlex.join(
            [
                os.path.relpath(sys.executable)
                if not os.path.isabs(sys.argv[0])
                else sys.executable,
                *sys.argv,
            ]
        )
        if argv is None
        else shlex.join(["benchmarks/run.py", *argv])
    )
    t_start = time.perf_counter()
    log(f"keras-bigarray benchmarks: cases {', '.join(cases)}; data in {cfg.data_dir}")
    machine = machine_info(cfg.data_dir, REPO)
    log(
        f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram']} RAM; "
        f"load {machine['load_average_at_start']}"
    )

    import _cases
    from _harness import CaseResult

    plan = []
    for c in cases:
        if c == "pipeline":
            plan.append(("pipeline", lambda: _cases.case_pipeline(cfg)))
        elif c == "hdf5":
            plan.append(
                ("hdf5_uncompressed", lambda: _cases.case_hdf5(cfg, gzip=False))
            )
            plan.append(("hdf5_gzip", lambda: _cases.case_hdf5(cfg, gzip=True)))
        elif c == "fit":
            for spe in cfg.fit_spe:
                plan.append(
                    (f"fit_spe{spe}", lambda spe=spe: _cases.case_fit(cfg, spe))
                )
        elif c == "memory":
            plan.append(("memory", lambda: _cases.case_memory(cfg)))
        elif c == "gpu":
            plan.append(("gpu", lambda: _cases.case_gpu(cfg)))
        elif c == "huge":
            plan.append(("huge", lambda: _cases.case_huge(cfg)))

    results: dict[str, CaseResult] = {}
    for key, run in plan:
        log(f"case {key} ...")
        t0 = time.perf_counter()
        try:
            results[key] = run()
        except Exception as e:  # noqa: BLE001 - report it, go on with the others
            traceback.print_exc()
            results[key] = CaseResult(
                key, key, "MB/s", "", skipped=f"failed: {type(e).__name__}: {e}"
            )
        r = results[key]
        log(
            f"case {key} done in {time.perf_counter() - t0:.0f} s"
            + (f" ({r.skipped})" if r.skipped else "")
        )

    from _chart import render, write_png
    from _report import evaluate, panels, results_markdown, targets_text

    targets = evaluate(results)
    chart = stem + ".png"
    try:
        img = render(
            panels(results), f"KERAS-BIGARRAY BENCHMARKS {machine['date'][:10]}"
        )
        write_png(chart, img)
        chart_name = os.path.relpath(chart, os.path.dirname(out))
    except Exception as e:  # noqa: BLE001 - a report without a chart beats none
        log(f"chart not written: {type(e).__name__}: {e}")
        chart_name = None
    elapsed = time.perf_counter() - t_start
    md = results_markdown(
        results, targets, machine, command, chart_name, elapsed, notes
    )
    with open(out, "w") as f:
        f.write(md)
    with open(stem + ".json", "w") as f:
        json.dump(
            {
                "machine": machine,
                "command": command,
                "config": {k: v for k, v in vars(cfg).items() if k != "notes"},
                "cases": {k: v.to_json() for k, v in results.items()},
                "targets": [vars(t) for t in targets],
            },
            f,
            indent=1,
            default=str,
        )
    print("\nDESIGN.md targets (ratios of medians in this run):")
    print(targets_text(targets))
    print(
        f"\nwrote {out}, {chart if chart_name else '(no chart)'}, {stem}.json "
        f"in {elapsed / 60:.1f} min"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
