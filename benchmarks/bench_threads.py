"""Thread count against inference speed: the evaluation batch of 32 and one PNG slice, plain PyTorch and the
int8 ONNX Runtime export, with 1, 2, ... torch / ONNX Runtime threads, in one process.

    python benchmarks/bench_threads.py [--threads 1 2] [--width 1.0] [--image-size 224]

Uses the same workloads as `crosssite bench` (`crosssite.bench.eval_fn` / `latency_fn`); medians of 3
evaluation batches and of 10 single slices after one warm-up each.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from crosssite import bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        file = bench.png_file(workdir)
        for threads in args.threads:
            torch.set_num_threads(threads)  # OnnxBackend sessions take torch's thread count too
            for mode in (bench.Mode(), bench.Mode(int8=True)):
                batch = bench.eval_fn(mode, args.width, args.image_size, 32, workdir)
                seconds = statistics.median(bench.timed(batch, 3, 1))
                one = bench.latency_fn(mode, args.width, args.image_size, file, workdir)
                latency = statistics.median(bench.timed(one, 10, 1))
                print(f"threads {threads}  {mode.name:<6} evaluation of 32: {seconds:.2f} s   "
                      f"one slice p50: {1e3 * latency:.1f} ms", flush=True)


if __name__ == "__main__":
    main()
