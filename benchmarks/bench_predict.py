"""`crosssite predict` (and optionally `crosssite evaluate --external`) on real slices: today's code against an
older commit's, side by side in one run, on the same slices.

    python benchmarks/bench_predict.py [--slices 1110] [--old 57f6898] [--repeats 2] [--busy] [--evaluate]

The slices: every slice of site B (746, PNG and JPEG), then site A's in name order, COVID and non-COVID
alternating, up to ``--slices``, linked into a temporary ``covid/`` + ``non-covid/`` folder (a `folder` site).
The old code is the ``--old`` commit's ``src/`` (``git archive``), run with the same interpreter and packages.

Each path is one `crosssite predict FOLDER --out rows.csv` process with the shipped model (its card: 64 px,
``tta=flip``); its wall time includes the interpreter's start, and its peak RSS is the kernel's high-water mark
of that process (``os.wait4``). Every path runs once untimed first (the warm-up: files into the page cache,
bytecode compiled; its time is reported), then the paths run in turn, ``--repeats`` rounds, and the median
counts. Paths:

* ``old``: the old commit;
* ``new``: this tree (every file decoded in full: its rows must equal the old ones to 1e-5);
* ``new --draft-jpeg``: this tree, large JPEGs decoded at a reduced scale (P(COVID) moves on those);
* with ``--busy``: ``new`` again while a busy-loop process holds one core (``busy`` rows).

Reported: slices/s, peak RSS, max |P(COVID) difference| to the old rows (all slices, and the JPEGs alone), and the
machine: CPU model, cores, /proc/loadavg and runnable threads before and after. A ratio is printed only when the
repeats of a path agree (spread below ``--max-spread``) and the load stayed below the cores; otherwise the report
says why not. ``--evaluate``: `crosssite evaluate MODEL --external x=FOLDER --adapt-strategy tent
--adapt-strategy ensemble` (all seven strategies) once per code, each with a fresh decode cache.
``--json`` prints one JSON object.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CROSSSITE_DATA", ROOT.parent / "shared" / "data"))
JPEG = (".jpg", ".jpeg")


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), [])
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "amx": any(f.startswith("amx") for f in flags),
            "avx512": "avx512f" in flags}


def load() -> dict:
    fields = Path("/proc/loadavg").read_text().split()
    return {"loadavg_1m": float(fields[0]), "runnable": int(fields[3].split("/")[0])}


def slice_folder(tmp: Path, n: int) -> Path:
    """``tmp/slices/{covid,non-covid}/`` linking site B's slices, then site A's alternating classes, ``n`` in all."""
    b = [(p, "covid") for p in sorted((DATA / "covid_ct" / "CT_COVID").iterdir())]
    b += [(p, "non-covid") for p in sorted((DATA / "covid_ct" / "CT_NonCOVID").iterdir())]
    covid = sorted((DATA / "sars_cov2_ct" / "COVID").iterdir())
    non = sorted((DATA / "sars_cov2_ct" / "non-COVID").iterdir())
    a = [x for pair in zip(((p, "covid") for p in covid), ((p, "non-covid") for p in non)) for x in pair]
    chosen = (b + a)[:n]
    folder = tmp / "slices"
    for i, (path, label) in enumerate(chosen):
        link = folder / label / f"{i:05d}_{path.name}"
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(path)
    return folder


def old_tree(tmp: Path, commit: str) -> Path:
    """The ``commit``'s ``src/`` under ``tmp/old``."""
    out = tmp / "old"
    out.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "src"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
    return out / "src"


def run(src: Path, args: list[str], cache: Path) -> dict:
    """One ``python -m crosssite ARGS`` process with ``src`` first on the path: wall seconds, peak RSS (MB)."""
    env = {**os.environ, "PYTHONPATH": str(src), "CROSSSITE_CACHE": str(cache)}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "crosssite", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    code = os.waitstatus_to_exitcode(status)
    if code not in (0, 1):  # 1: some input failed, which the rows show
        raise SystemExit(f"crosssite {' '.join(args)} failed ({code}):\n{err[-2000:]}")
    return {"seconds": wall, "peak_rss_mb": usage.ru_maxrss / 1024}


def rows(path: Path) -> dict[str, float]:
    with open(path, newline="") as f:
        return {r["path"]: float(r["p_covid"]) for r in csv.DictReader(f) if r["kind"] == "slice"}


def max_diff(a: dict[str, float], b: dict[str, float], only_jpeg: bool = False) -> float:
    keys = [k for k in a if not only_jpeg or k.lower().endswith(JPEG)]
    if set(a) != set(b):
        raise SystemExit(f"the paths scored different slices: {len(set(a) ^ set(b))} differ")
    return max((abs(a[k] - b[k]) for k in keys), default=0.0)


def busy_core() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=1110)
    parser.add_argument("--old", default="57f6898", help="the commit to compare with")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--busy", action="store_true", help="also run the new path beside a busy core")
    parser.add_argument("--evaluate", action="store_true", help="also time evaluate --external, old and new")
    parser.add_argument("--max-spread", type=float, default=0.25, help="largest (max - min) / median of repeats "
                        "for which a ratio is printed")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result: dict = {"machine": machine(), "load_before": load(), "slices": args.slices, "old": args.old}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        folder = slice_folder(tmp, args.slices)
        old = old_tree(tmp, args.old)
        new = ROOT / "src"
        paths = {"old": (old, []), "new": (new, []), "new --draft-jpeg": (new, ["--draft-jpeg"])}
        cache = tmp / "cache"
        out = {name: tmp / f"{i}.csv" for i, name in enumerate(paths)}

        def once(name: str) -> dict:
            src, extra = paths[name]
            return run(src, ["predict", str(folder), "--out", str(out[name]), *extra], cache)

        result["warmup_s"] = {name: round(once(name)["seconds"], 2) for name in paths}
        times: dict[str, list[dict]] = {name: [] for name in paths}
        for _ in range(args.repeats):  # interleaved: a neighbour's burst hits every path alike
            for name in paths:
                times[name].append(once(name))
        if args.busy:
            hog = busy_core()
            try:
                times["new, busy core"] = [once("new") for _ in range(args.repeats)]
            finally:
                hog.kill()
                hog.wait()
        result["load_after"] = load()
        base = rows(out["old"])
        n = len(base)
        table = {}
        for name, runs in times.items():
            seconds = [r["seconds"] for r in runs]
            med = statistics.median(seconds)
            table[name] = {"seconds": round(med, 2), "slices_per_s": round(n / med, 1),
                           "peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs)),
                           "spread": round((max(seconds) - min(seconds)) / med, 3)}
        for name in ("new", "new --draft-jpeg"):
            got = rows(out[name])
            table[name]["max_abs_dp"] = max_diff(base, got)
            table[name]["max_abs_dp_jpeg"] = max_diff(base, got, only_jpeg=True)
            table[name]["max_abs_dp_not_jpeg"] = max(
                (abs(base[k] - got[k]) for k in base if not k.lower().endswith(JPEG)), default=0.0)
        result["scored_slices"] = n
        result["paths"] = table
        cores = result["machine"]["cores"]
        loaded = max(result["load_before"]["loadavg_1m"], result["load_after"]["loadavg_1m"]) > cores
        spread = max(table[k]["spread"] for k in ("old", "new"))
        if loaded:
            result["ratio"] = f"not given: the 1-minute load ({result['load_after']['loadavg_1m']}) exceeded " \
                              f"the {cores} cores, so other processes shared the timings"
        elif spread > args.max_spread:
            result["ratio"] = f"not given: repeats of one path differ by {spread:.0%} of their median"
        else:
            result["ratio"] = round(table["old"]["seconds"] / table["new"]["seconds"], 2)
        if args.evaluate:
            result["evaluate_s"] = {}
            for name in ("old", "new"):
                src = paths[name][0]
                cmd = ["evaluate", str(ROOT / "src" / "crosssite" / "pretrained" / "crosssite-recipe-cpu64"),
                       "--external", f"x={folder}", "--adapt-strategy", "tent", "--adapt-strategy", "ensemble",
                       "--json"]
                result["evaluate_s"][name] = round(run(src, cmd, tmp / f"cache-{name}")["seconds"], 1)
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
    return result


def print_table(result: dict) -> None:
    m = result["machine"]
    print(f"{m['cpu']}, {m['cores']} cores (AMX {m['amx']}, AVX-512 {m['avx512']}); load before "
          f"{result['load_before']}, after {result['load_after']}")
    print(f"{result['scored_slices']} slices; warm-up s: {result['warmup_s']}")
    print(f"| path | s | slices/s | peak RSS MB | spread | max abs dP (all / JPEG / other) |")
    print("|---|---|---|---|---|---|")
    for name, r in result["paths"].items():
        dp = (f"{r['max_abs_dp']:.2g} / {r['max_abs_dp_jpeg']:.2g} / {r['max_abs_dp_not_jpeg']:.2g}"
              if "max_abs_dp" in r else "")
        print(f"| {name} | {r['seconds']} | {r['slices_per_s']} | {r['peak_rss_mb']} | {r['spread']} | {dp} |")
    print(f"ratio old / new: {result['ratio']}")
    if "evaluate_s" in result:
        print(f"evaluate --external, 7 strategies: {result['evaluate_s']} s")


if __name__ == "__main__":
    main()
