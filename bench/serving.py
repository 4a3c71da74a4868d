"""Serving benchmark: the worker over HTTP vs the bare diffusers loop a user would write.

Measured in one run, on one machine:
- raw: `DiffusionPipeline.from_pretrained(model)` then `pipe(prompt, ...)` in a loop, one image per call;
- worker: `python -m diffusion_worker serve` in a subprocess, driven over HTTP (b64_json) by
  `concurrency` client threads.
Reports latency overhead at concurrency 1 and throughput ratios at each concurrency, with p50/p95
latency and the batch sizes the worker reached (from its /metrics). Never part of `make test`.

    python bench/serving.py --size 64x64 --steps 4 --guidance 0
    python bench/serving.py --model /path/to/pipeline --size 512x512 --steps 30
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx

PROMPT = "a red circle on a blue background"


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
    }


class RawBaseline:
    """The loop a user writes: one pipeline, one image per call, sequential."""

    def __init__(self, model: str, width: int, height: int, steps: int, guidance: float) -> None:
        from diffusers import DiffusionPipeline

        self.pipe = DiffusionPipeline.from_pretrained(model)
        self.pipe.set_progress_bar_config(disable=True)
        self.kwargs = {
            "num_inference_steps": steps,
            "guidance_scale": guidance,
            "width": width,
            "height": height,
        }

    def call(self, seed: int) -> None:
        import torch

        self.pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(seed), **self.kwargs)

    def run(self, images: int) -> tuple[float, list[float]]:
        """`images` sequential calls; returns (images per second, latencies)."""
        latencies = []
        started = time.perf_counter()
        for seed in range(images):
            t0 = time.perf_counter()
            self.call(seed)
            latencies.append(time.perf_counter() - t0)
        return images / (time.perf_counter() - started), latencies


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_worker(
    model: str, port: int, max_batch_size: int, batch_wait_ms: float, log_path: Path
) -> subprocess.Popen[bytes]:
    command = [
        sys.executable,
        "-m",
        "diffusion_worker",
        "serve",
        "--model",
        model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-batch-size",
        str(max_batch_size),
        "--max-queue",
        "1024",
        "--max-inference-steps",
        "1000",
        "--batch-wait-ms",
        str(batch_wait_ms),
    ]
    process = subprocess.Popen(command, stdout=log_path.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"worker exited; see {log_path}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready").status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("worker not ready within 300 s")
        time.sleep(0.2)


def batch_histogram(url: str) -> dict[str, float]:
    """Cumulative batch-size bucket counts from the worker's /metrics."""
    text = httpx.get(f"{url}/metrics").text
    buckets = re.findall(r'diffusion_worker_batch_size_bucket\{le="([^"]+)"\} ([0-9.e+]+)', text)
    return {le: float(count) for le, count in buckets}


def batch_sizes_between(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    """Non-cumulative counts of batches per bucket, from two cumulative snapshots."""
    result: dict[str, int] = {}
    previous = 0.0
    for le in after:
        cumulative = after[le] - before.get(le, 0.0)
        if cumulative - previous:
            result[f"<={le}"] = int(cumulative - previous)
        previous = cumulative
    return result


def http_run(url: str, body: dict[str, Any], concurrency: int, requests: int) -> tuple[float, list[float]]:
    """Send `requests` requests with `concurrency` clients; returns (wall seconds, latencies)."""
    latencies: list[float] = []

    def one(index: int, client: httpx.Client) -> None:
        payload = {**body, "nvext": {**body["nvext"], "seed": index}}
        t0 = time.perf_counter()
        response = client.post(f"{url}/v1/images/generations", json=payload)
        latencies.append(time.perf_counter() - t0)
        response.raise_for_status()

    with httpx.Client(timeout=600, limits=httpx.Limits(max_connections=concurrency)) as client:
        started = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(lambda i: one(i, client), range(requests)))
        return time.perf_counter() - started, latencies


def versions() -> dict[str, str]:
    names = ("torch", "diffusers", "transformers", "fastapi", "uvicorn", "image-diffusion-operator")
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    found["python"] = platform.python_version()
    return found


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "device": "cpu"}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="diffusers pipeline directory (default: build the tiny model)")
    parser.add_argument("--size", default="64x64")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--guidance", type=float, default=0.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-wait-ms", type=float, default=0)
    parser.add_argument("--label", default="", help="suffix of the result file name")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    workdir = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    model = args.model
    if model is None:
        from diffusion_worker.tiny_model import build_tiny_pipeline

        model = str(build_tiny_pipeline(workdir / "tiny-sd"))
    print(f"{model} {args.size} steps={args.steps} guidance={args.guidance}", flush=True)
    raw = RawBaseline(model, width, height, args.steps, args.guidance)
    for seed in range(3):
        raw.call(seed)  # warm-up
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_worker(model, port, args.max_batch_size, args.batch_wait_ms, workdir / "worker.log")
    body = {
        "prompt": PROMPT,
        "size": args.size,
        "response_format": "b64_json",
        "nvext": {"num_inference_steps": args.steps, "guidance_scale": args.guidance},
    }
    raw_images = 16
    raw_throughputs: list[float] = []
    raw_latencies: list[float] = []
    samples: dict[int, dict[str, Any]] = {
        c: {"throughputs": [], "latencies": [], "batches": {}} for c in args.concurrency
    }
    try:
        http_run(url, body, 1, 3)  # warm-up
        # Raw and worker repetitions alternate, so a change in machine load hits both sides alike.
        for repeat in range(args.repeats):
            throughput, latencies = raw.run(raw_images)
            raw_throughputs.append(throughput)
            raw_latencies.extend(latencies)
            for concurrency in args.concurrency:
                requests = max(8, concurrency * args.requests_per_client)
                before = batch_histogram(url)
                wall, latencies = http_run(url, body, concurrency, requests)
                sample = samples[concurrency]
                sample["throughputs"].append(requests / wall)
                sample["latencies"].extend(latencies)
                for bucket, count in batch_sizes_between(before, batch_histogram(url)).items():
                    sample["batches"][bucket] = sample["batches"].get(bucket, 0) + count
            print(f"  repeat {repeat + 1}/{args.repeats} done", flush=True)
    finally:
        process.terminate()
        process.wait(timeout=120)
    raw_summary = {"latency_s": summary(raw_latencies), "images_per_s": summary(raw_throughputs)}
    print(
        f"  raw: latency median {raw_summary['latency_s']['median'] * 1000:.1f} ms, "
        f"{raw_summary['images_per_s']['median']:.2f} images/s"
    )
    runs: list[dict[str, Any]] = []
    for concurrency, sample in samples.items():
        latencies = sample["latencies"]
        run: dict[str, Any] = {
            "concurrency": concurrency,
            "requests_per_repeat": max(8, concurrency * args.requests_per_client),
            "images_per_s": summary(sample["throughputs"]),
            "throughput_ratio_vs_raw_sequential": statistics.median(sample["throughputs"])
            / raw_summary["images_per_s"]["median"],
            "latency_s": {
                **summary(latencies),
                "p50": percentile(latencies, 0.5),
                "p95": percentile(latencies, 0.95),
            },
            "batch_sizes": sample["batches"],
        }
        if concurrency == 1:
            run["latency_overhead_ratio_vs_raw"] = (
                statistics.median(latencies) / raw_summary["latency_s"]["median"]
            )
        runs.append(run)
        overhead = f", overhead {run['latency_overhead_ratio_vs_raw']:.3f}x" if concurrency == 1 else ""
        print(
            f"  c={concurrency:>2}: {run['images_per_s']['median']:.2f} images/s "
            f"({run['throughput_ratio_vs_raw_sequential']:.2f}x raw){overhead}, "
            f"p50 {run['latency_s']['p50'] * 1000:.0f} ms, p95 {run['latency_s']['p95'] * 1000:.0f} ms, "
            f"batches {run['batch_sizes']}",
            flush=True,
        )
    result = {
        "benchmark": "serving",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions(),
        "settings": {
            "model": "tiny-sd (random weights, built locally)" if args.model is None else args.model,
            "size": args.size,
            "steps": args.steps,
            "guidance_scale": args.guidance,
            "repeats": args.repeats,
            "max_batch_size": args.max_batch_size,
            "batch_wait_ms": args.batch_wait_ms,
            "response_format": "b64_json",
            "raw_images_per_repeat": raw_images,
        },
        "raw": raw_summary,
        "worker": runs,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    label = f"-{args.label}" if args.label else ""
    out = args.out_dir / f"serving-cpu{os.cpu_count()}-{dt.date.today().isoformat()}{label}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
