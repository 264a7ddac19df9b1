"""Time ``vitscope.reports.build_report`` end to end on the quick demo's outputs, with a per-stage breakdown.

Goal (issue 14): the report of ``vitscope demo --quick`` (every figure as PNG, SVG and CSV, plus the HTML page)
builds in at most 6 s on 2 cores, with the per-model image figures of issue 14 included. The run directories
come from one ``vitscope demo --quick`` (about 80 s), made once and cached under ``--cache``; where a model's
directory lacks ``attention.npz`` (the image figures' data), ``vitscope attention --checkpoint RUN`` on 4 test
images adds it (CNNs have none). Each repeat runs in a fresh Python process (as the demo and
``vitscope report`` do: fonts and caches start cold, imports are done before the clock starts), so repeats do
not warm each other; wall time, the process CPU time (children included: render workers) and the load average
are printed per repeat, and the median.

    python benchmarks/bench_report.py [--repeats 3] [--old /tmp/old/src] [--no-breakdown] [--cache DIR]

``--old SRC`` times another checkout's sources too (e.g. ``git worktree add /tmp/old <commit>``, then
``--old /tmp/old/src``) and prints the ratio old / new. The breakdown runs one build in-process with timing
wrappers around the build's stages (loading, building the figures, PNG, SVG, CSV, HTML); it uses one worker
where the build offers the choice, so each stage's time is its CPU cost, not hidden behind another core.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ATTENTION_IMAGES = 4
SRC = HERE.parent / "src"

CHILD = r"""
import json, os, resource, sys, time, warnings
warnings.simplefilter("ignore")
import vitscope.reports as R
run_dirs, out = json.loads(sys.argv[1]), sys.argv[2]
load0 = os.getloadavg()[0]
c0, t0 = time.process_time(), time.perf_counter()
R.build_report(run_dirs, out, title="bench")
wall = time.perf_counter() - t0
ch = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"wall": wall, "cpu": time.process_time() - c0, "cpu_children": ch.ru_utime + ch.ru_stime,
                  "load": [load0, os.getloadavg()[0]]}))
"""


def demo_runs(cache: Path) -> list[str]:
    """The quick demo's run directories (made once: ``vitscope demo --quick --out CACHE/demo``)."""
    demo = cache / "demo"
    if not (demo / "results.json").is_file():
        print(f"making the quick demo's outputs under {demo} (about 80 s, once)", flush=True)
        if demo.exists():
            shutil.rmtree(demo)
        subprocess.run([sys.executable, "-m", "vitscope", "demo", "--quick", "--out", str(demo)], check=True,
                       stdout=subprocess.DEVNULL)
    models = json.loads((demo / "results.json").read_text())["models"]
    runs = [demo / "models" / k for k in models]
    for run in runs:  # issue 14's per-model image figures: `vitscope attention` output, where the demo lacks it
        if (run / "attention.npz").is_file() or (run / "no-attention").is_file():
            continue
        tmp = cache / f"attention-{run.name}"
        res = subprocess.run([sys.executable, "-m", "vitscope", "attention", "--checkpoint", str(run), "--data",
                              "elpv", "--split", "test", "--num-images", str(ATTENTION_IMAGES), "--out", str(tmp)],
                             capture_output=True, text=True)
        if res.returncode == 0:
            for name in ("attention.npz", "attention_meta.json"):
                shutil.copy(tmp / name, run / name)
        else:  # a CNN: no attention to draw
            (run / "no-attention").write_text(res.stderr)
        shutil.rmtree(tmp, ignore_errors=True)
    return [str(r) for r in runs]


def figure_files(out: Path) -> dict[str, int]:
    files = [p for p in (out.parent / "figures").rglob("*") if p.is_file()]
    return {ext: sum(p.suffix == ext for p in files) for ext in (".png", ".svg", ".csv")}


def time_build(src: Path, run_dirs: list[str], work: Path) -> dict:
    out = Path(tempfile.mkdtemp(dir=work)) / "report.html"
    env = {**os.environ, "PYTHONPATH": str(src)}
    res = subprocess.run([sys.executable, "-c", CHILD, json.dumps(run_dirs), str(out)], env=env, check=True,
                         capture_output=True, text=True)
    stats = json.loads(res.stdout.strip().splitlines()[-1])
    stats["files"] = figure_files(out)
    shutil.rmtree(out.parent)
    return stats


def timed(label: str, i: int, src: Path, run_dirs: list[str], work: Path) -> list[dict]:
    s = time_build(src, run_dirs, work)
    cpu = s["cpu"] + s["cpu_children"]
    print(f"{label:<14} repeat {i + 1}: {s['wall']:6.2f} s wall, {cpu:6.2f} s CPU ({s['cpu_children']:.2f} in "
          f"workers), load average {s['load'][0]:.2f} -> {s['load'][1]:.2f}; files {s['files']}", flush=True)
    return [s]


def breakdown(run_dirs: list[str], work: Path) -> None:
    """One in-process build with a timer around each stage's function (one worker where the build allows it)."""
    import inspect

    import vitscope.reports.build as B
    from vitscope.reports import render as R

    totals: dict[str, float] = {}
    counts: dict[str, int] = {}

    def wrap(owner, attr: str, stage) -> None:
        fn = getattr(owner, attr, None)
        if fn is None:
            return

        def timed_fn(*a, **k):
            name = stage(a, k) if callable(stage) else stage
            t0 = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                totals[name] = totals.get(name, 0.0) + time.process_time() - t0
                counts[name] = counts.get(name, 0) + 1

        setattr(owner, attr, timed_fn)

    def fmt_of(a, k) -> str:
        return str(k.get("fmt", a[1] if len(a) > 1 else "?")).upper()

    wrap(B, "load_runs", "loading")
    wrap(B, "run_section", "building figures")
    wrap(B, "comparison_section", "building figures")
    wrap(R, "lay_out", "layout")
    wrap(R, "to_bytes", fmt_of)
    wrap(B, "csv_bytes", "CSV")
    wrap(B, "figure_html", "HTML")
    wrap(B, "render_page", "HTML")
    kwargs = {"workers": 1} if "workers" in inspect.signature(B.build_report).parameters else {}
    out = Path(tempfile.mkdtemp(dir=work)) / "report.html"
    gc.freeze()  # as the build does before forking its workers: collections skip what is loaded already
    c0, t0 = time.process_time(), time.perf_counter()
    B.build_report(run_dirs, out, title="bench", **kwargs)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    shutil.rmtree(out.parent)
    print(f"\nper-stage CPU time, one in-process build {kwargs or ''} ({wall:.2f} s wall, {cpu:.2f} s CPU):")
    for name, sec in totals.items():
        print(f"  {name:<17} {sec:6.2f} s  ({counts[name]} calls)")
    print(f"  {'rest':<17} {cpu - sum(totals.values()):6.2f} s  "
          "(writing files, layout outside the stages, ...)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "vitscope-bench-report")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--old", type=Path, default=None, help="src directory of another checkout to time too")
    ap.add_argument("--no-breakdown", action="store_true")
    args = ap.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    run_dirs = demo_runs(args.cache)
    work = Path(tempfile.mkdtemp(dir=args.cache, prefix="out-"))
    print(f"{len(run_dirs)} run directories: {', '.join(Path(d).name for d in run_dirs)}; {os.cpu_count()} CPUs; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"this checkout: {SRC}" + (f"; old checkout: {args.old}" if args.old else ""))
    try:
        new, old = [], [] if args.old else None
        for i in range(args.repeats):  # interleaved, so that both see the same load on a shared machine
            new += timed("this checkout", i, SRC, run_dirs, work)
            if args.old:
                old += timed("old checkout", i, args.old, run_dirs, work)
        med = {k: statistics.median(r["wall"] for r in v) for k, v in (("new", new), ("old", old)) if v}
        cpu = {k: statistics.median(r["cpu"] + r["cpu_children"] for r in v)
               for k, v in (("new", new), ("old", old)) if v}
        print(f"\nmedian: this checkout {med['new']:.2f} s wall, {cpu['new']:.2f} s CPU (goal <= 6 s wall)")
        if old:
            print(f"median: old checkout  {med['old']:.2f} s wall, {cpu['old']:.2f} s CPU")
            print(f"ratio old / new: {med['old'] / med['new']:.2f}x wall, {cpu['old'] / cpu['new']:.2f}x CPU")
            if old[0]["files"] != new[0]["files"]:
                print(f"note: file counts differ (an old checkout without issue 14's image figures draws fewer): "
                      f"old {old[0]['files']}, this {new[0]['files']}")
        if not args.no_breakdown:
            sys.path.insert(0, str(SRC))
            breakdown(run_dirs, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
