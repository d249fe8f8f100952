"""Load benchmark of `crosssite serve` on 127.0.0.1: concurrent clients posting single PNG slices, against the
int8 ONNX Runtime export and against the PyTorch model, next to the offline evaluation rate of the same files.

    python benchmarks/bench_serve.py [--clients 8] [--requests 200] [--max-seconds 420] [--threads 2]
                                     [--backends int8 torch] [--json FILE]

Model: what `crosssite bench` measures -- ``covidnet_redesign``, 2 sites, width 1, 224 px, untrained (speed
does not depend on the weights) -- built, saved and exported by `crosssite.bench.onnx_backend` (fp32 export,
then int8 quantisation calibrated on random inputs, as the bench does).

1. Offline rate, in this process before any server runs: `crosssite bench`'s figure (b), the evaluation
   forward of 32 images, by its own functions (`crosssite.bench.eval_fn`, median of ``--steps`` after one
   warm-up), for the int8 export and for plain PyTorch.
2. For each backend: ``crosssite serve MODEL --threads N`` in a subprocess bound to 127.0.0.1; after
   ``/readyz`` answers and one warm-up request per client, ``--clients`` threads each send ``--requests``
   ``POST /v1/predict`` with one real site-A PNG slice (distinct files, in turn) over a keep-alive
   connection. Stops early, and says so, after ``--max-seconds``. Reports p50 / p99 latency, throughput
   (answered requests / wall time), errors (any answer but 200 with one scored slice), the server's peak RSS
   (VmHWM of its process), the micro-batcher's forward passes, and throughput / offline rate.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from crosssite import bench


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def offline_rate(mode: bench.Mode, workdir: Path, steps: int, batch: int = 32) -> float:
    """Images/s of `crosssite bench`'s evaluation forward of ``batch`` images (median of ``steps``)."""
    run = bench.eval_fn(mode, 1.0, 224, batch, workdir)
    return batch / statistics.median(bench.timed(run, steps, warmup=1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_gb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9
    raise RuntimeError(f"no VmHWM for process {pid}")


def start_server(model: Path, port: int, threads: int, queue: int, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "crosssite", "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
               "--threads", str(threads), "--queue", str(queue)]
    server = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"server exited with {server.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    server.kill()
    raise RuntimeError("server not ready within 300 s")


def load(url: str, files: list[Path], clients: int, requests: int, max_seconds: float) -> dict:
    """``clients`` threads x ``requests`` single-slice requests; latencies and failures."""
    payloads = [(f.name, f.read_bytes()) for f in files]
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    stop_at = [float("inf")]  # set once every client is ready
    barrier = threading.Barrier(clients + 1)

    def client(k: int) -> None:
        with httpx.Client(timeout=300) as http:
            name, data = payloads[k % len(payloads)]
            http.post(url, files=[("files", (name, data, "image/png"))])  # warm-up, not counted
            barrier.wait()
            for i in range(requests):
                if time.perf_counter() > stop_at[0]:
                    return
                name, data = payloads[(k * requests + i) % len(payloads)]
                start = time.perf_counter()
                try:
                    response = http.post(url, files=[("files", (name, data, "image/png"))])
                    ok = response.status_code == 200 and response.json()["counts"] == {
                        "files": 1, "slices": 1, "volumes": 0, "errors": 0}
                    if not ok:
                        errors.append(f"{response.status_code}: {response.text[:200]}")
                except httpx.HTTPError as e:
                    errors.append(f"{type(e).__name__}: {e}")
                latencies[k].append(time.perf_counter() - start)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    stop_at[0] = started + max_seconds
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    flat = np.array([x for per in latencies for x in per])
    return {
        "requests": int(flat.size), "planned": clients * requests, "stopped_early": bool(flat.size < clients * requests),
        "wall_s": round(wall, 1), "throughput_rps": round(flat.size / wall, 2),
        "p50_ms": round(1e3 * float(np.percentile(flat, 50)), 1),
        "p99_ms": round(1e3 * float(np.percentile(flat, 99)), 1),
        "errors": len(errors), "first_errors": errors[:3],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200, help="per client")
    parser.add_argument("--max-seconds", type=float, default=420, help="per backend; stops the clients after")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="forward-pass threads")
    parser.add_argument("--steps", type=int, default=5, help="offline evaluation batches timed (median)")
    parser.add_argument("--backends", nargs="+", choices=["int8", "torch"], default=["int8", "torch"])
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()

    data = Path(os.environ.get("CROSSSITE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    files = sorted((data / "sars_cov2_ct" / "COVID").glob("*.png"))[:200]
    if not files:
        sys.exit(f"no site-A slices under {data}; set CROSSSITE_DATA")
    torch.set_num_threads(args.threads)
    result: dict = {
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
                    "load_average_before": os.getloadavg()},
        "config": {"clients": args.clients, "requests_per_client": args.requests, "max_seconds": args.max_seconds,
                   "slices": len(files), "model": "covidnet_redesign width 1, 224 px, 2 sites"},
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        bench.onnx_backend(bench.Mode(int8=True), 1.0, 224, workdir)  # writes the model, fp32 and int8 exports
        models = {"int8": workdir / "bench_w1.0_224_int8.onnx", "torch": workdir / "bench_w1.0_224"}
        modes = {"int8": bench.Mode(int8=True), "torch": bench.Mode()}
        result["offline_images_per_s"] = {b: round(offline_rate(modes[b], workdir, args.steps), 2) for b in args.backends}
        print(f"offline evaluation (images/s): {result['offline_images_per_s']}", flush=True)
        for backend in args.backends:
            port = free_port()
            log = workdir / f"server_{backend}.log"
            server = start_server(models[backend], port, args.threads, queue=4 * args.clients, log=log)
            try:
                run = load(f"http://127.0.0.1:{port}/v1/predict", files, args.clients, args.requests, args.max_seconds)
                run["server_peak_rss_gb"] = round(peak_rss_gb(server.pid), 2)
                probe = httpx.get(f"http://127.0.0.1:{port}/readyz").json()
                run["forward_passes"] = probe["forward_passes"]
                run["mean_batch"] = round(probe["slices_scored"] / max(1, probe["forward_passes"]), 2)
                run["largest_batch"] = probe["largest_batch"]
            finally:
                server.terminate()
                server.wait(30)
            run["of_offline"] = round(run["throughput_rps"] / result["offline_images_per_s"][backend], 3)
            result[backend] = run
            print(f"{backend}: {json.dumps(run)}", flush=True)
    result["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    result["machine"]["load_average_after"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
