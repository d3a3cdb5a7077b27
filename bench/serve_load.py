"""Throughput and latency of ``dalle2-rt serve`` under concurrent clients, against one-at-a-time ``Pipeline``.

    python -m bench.serve_load                       # engines/shapes-v2, 1 / 4 / 16 clients, 64 images each
    python -m bench.serve_load --clients 1 4 16 --images 64 --threads 2 --max-batch 8 --window-ms 10
    python -m bench.serve_load --workers 2 --server-threads 1 --max-batch 2   # two passes at once, 1 thread each
    python -m bench.serve_load --screenshot bench/serve_page.png     # also: the web page after a generation

One run measures both sides on the same images (the same prompts and seeds, one image a request):
1. baseline: ``Pipeline`` (in a fresh process per configuration: onnxruntime's shared pool has one size per
   process) called once per image, one after the other, with --threads threads and with 1 thread; the better
   of the two is what the service is measured against. Also, as the ceiling of what batching alone can give
   on the machine, the same number of images as calls of 8 (with --threads);
2. the service in a subprocess on 127.0.0.1 (``python -m dalle2_rt.serve``), with N closed-loop clients (each
   sends its next request when the previous one is answered) until the images are made;
3. the baselines again (the machine may be shared: the two rounds show how much it drifted).
Every served image is compared with the baseline's: the pixels must be identical (the seed contract).
Both sides use onnxruntime's shared thread pool, as the CLI does; the service runs --workers passes at once
with --server-threads threads (default: --threads / --workers).
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from .engines import BUNDLED

REPO = Path(__file__).resolve().parents[1]
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "cyan"]
SHAPES = ["circle", "square", "triangle", "star", "cross"]


def prompts(n: int) -> list[tuple[str, int]]:
    """n (prompt, seed) pairs: shapes-world captions, each with its own seed."""
    return [(f"a {COLOURS[i % 8]} {SHAPES[(i // 8) % 5]} on a black background", 1000 + i) for i in range(n)]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def baseline(engines, jobs, threads, batched: bool = True) -> tuple[dict, dict]:
    from dalle2_rt import Pipeline

    pipe = Pipeline.load(engines, threads=threads, shared_threads=True)
    pipe(jobs[0][0], seed=jobs[0][1])  # warm-up
    pixels, lat = {}, []
    start = time.perf_counter()
    for prompt, seed in jobs:
        t = time.perf_counter()
        pixels[prompt, seed] = np.asarray(pipe(prompt, seed=seed)[0])
        lat.append(time.perf_counter() - t)
    wall = time.perf_counter() - start
    stats = {"images_per_s": len(jobs) / wall, "p50_s": pct(lat, 50), "p99_s": pct(lat, 99)}
    if not batched:
        return stats, pixels
    # the ceiling of batching on this machine: the same images as calls of 8 (one prompt, seeds s … s+7 become
    # indices 0 … 7 of one seed, so other pixels, the same work)
    start = time.perf_counter()
    for a in range(0, len(jobs), 8):
        pipe(jobs[a][0], seed=jobs[a][1], num_images=min(8, len(jobs) - a))
    stats["batched_8_images_per_s"] = len(jobs) / (time.perf_counter() - start)
    return stats, pixels


def baseline_apart(engines, jobs, threads, batched: bool = True) -> tuple[dict, dict]:
    """``baseline`` in a fresh process (its own onnxruntime thread pool)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(baseline, (engines, jobs, threads, batched))


def start_server(args) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "dalle2_rt.serve", "--port", "0", "--log-level", "warning",
           "--max-batch", str(args.max_batch), "--batch-window-ms", str(args.window_ms), "--max-queue", "256"]
    cmd += ["--engines", str(args.engines)] if args.engines else []
    threads = args.server_threads or max(1, args.threads // args.workers)
    cmd += ["--threads", str(threads), "--workers", str(args.workers)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if "listening on " not in line:
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    return proc, line.split("listening on ")[1].split()[0]


def load(url: str, jobs, clients: int, max_batch: int) -> tuple[dict, dict]:
    import httpx

    todo = list(jobs)
    lat, served = [], {}

    def client():
        with httpx.Client(base_url=url, timeout=300) as c:
            while todo:
                try:
                    prompt, seed = todo.pop()
                except IndexError:
                    return
                t = time.perf_counter()
                reply = c.post("/v1/images", json={"prompt": prompt, "seed": seed})
                lat.append(time.perf_counter() - t)
                reply.raise_for_status()
                png = base64.b64decode(reply.json()["data"][0]["b64_json"])
                served[prompt, seed] = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))

    with httpx.Client(base_url=url, timeout=300) as c:  # warm-up: sessions and arenas at the pass sizes used
        for _ in range(2):
            c.post("/v1/images", json={"prompt": "a red circle", "seed": 0, "n": min(max_batch, 16)})
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(client) for _ in range(clients)]:
            f.result()
    wall = time.perf_counter() - start
    return {"images_per_s": len(jobs) / wall, "p50_s": pct(lat, 50), "p99_s": pct(lat, 99)}, served


def metrics_batch_mean(url: str) -> float:
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        if line.startswith(("dalle2rt_batch_images_sum", "dalle2rt_batch_images_count")):
            name, value = line.split()
            values[name] = float(value)
    return values["dalle2rt_batch_images_sum"] / max(1.0, values["dalle2rt_batch_images_count"])


def screenshot(url: str, path: Path) -> None:
    from playwright.sync_api import sync_playwright

    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=os.environ.get("DALLE2_RT_CHROMIUM", "/usr/bin/chromium"),
                                    args=args)
        page = browser.new_page(viewport={"width": 900, "height": 560})
        page.goto(url + "/")
        page.fill("#prompt", "a large red circle on the left, black background")
        page.fill("#n", "4")
        page.fill("#seed", "7")
        page.click("#go")
        page.wait_for_function("document.getElementById('status').textContent.startsWith('done')", timeout=120_000)
        page.screenshot(path=str(path))
        browser.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve_load", description=__doc__.split("\n")[0])
    p.add_argument("--engines", type=Path, default=None, help="engine folder (default: engines/shapes-v2)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--images", type=int, default=64, help="images per measurement (one a request)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="baseline threads (default: one a core)")
    p.add_argument("--workers", type=int, default=1, help="the service's passes at once (serve --workers)")
    p.add_argument("--server-threads", type=int, help="the service's threads (default: --threads / --workers)")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--window-ms", type=float, default=10.0)
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--screenshot", type=Path, help="save a screenshot of the web page here")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    jobs = prompts(args.images)
    engines = args.engines or BUNDLED

    def baselines():
        return {f"{args.threads} threads": baseline_apart(engines, jobs, args.threads),
                "1 thread": baseline_apart(engines, jobs, 1, batched=False)} if args.threads > 1 else {
                "1 thread": baseline_apart(engines, jobs, 1)}

    before = baselines()
    reference = next(iter(before.values()))[1]
    identical = all(np.array_equal(b[1][k], reference[k]) for b in before.values() for k in reference)
    rows = []
    proc, url = start_server(args)
    try:
        for clients in args.clients:
            served_stats, served = load(url, jobs, clients, args.max_batch)
            identical &= all(np.array_equal(served[k], reference[k]) for k in reference)
            rows.append((clients, served_stats))
        mean_batch = metrics_batch_mean(url)
        if args.screenshot:
            screenshot(url, args.screenshot)
    finally:
        proc.terminate()
        proc.wait(60)
    after = baselines()
    rates = {name: statistics.mean([before[name][0]["images_per_s"], after[name][0]["images_per_s"]])
             for name in before}
    best = max(rates, key=rates.get)
    base_rate = rates[best]

    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; python {platform.python_version()}")
    print(f"engines {engines.name}, manifest defaults, {args.images} images a measurement, one a request; service "
          f"--workers {args.workers} --threads {args.server_threads or max(1, args.threads // args.workers)} "
          f"--max-batch {args.max_batch} --batch-window-ms {args.window_ms:g}")
    print(f"pixels identical (served, and every baseline, to the first baseline's): {'yes' if identical else 'NO'}; "
          f"mean images per pass over the run: {mean_batch:.1f}; measured against: one at a time, {best}\n")
    print("| | images/s | p50 latency | p99 latency | vs one-at-a-time |")
    print("|---|---|---|---|---|")
    for name in before:
        for when, b in (("before", before[name][0]), ("after", after[name][0])):
            print(f"| Pipeline one at a time, {name} ({when}) | {b['images_per_s']:.2f} | {b['p50_s'] * 1000:.0f} ms | "
                  f"{b['p99_s'] * 1000:.0f} ms | {b['images_per_s'] / base_rate:.2f}× |")
    first = next(iter(before))
    batched = statistics.mean([before[first][0]["batched_8_images_per_s"], after[first][0]["batched_8_images_per_s"]])
    print(f"| Pipeline, 8 images a call, {first} (no server: what batching alone gives here) | {batched:.2f} | — | — | "
          f"{batched / base_rate:.2f}× |")
    for clients, s in rows:
        print(f"| served, {clients} client{'s' if clients > 1 else ''} | {s['images_per_s']:.2f} | "
              f"{s['p50_s'] * 1000:.0f} ms | {s['p99_s'] * 1000:.0f} ms | {s['images_per_s'] / base_rate:.2f}× |")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_name(), "identical": identical, "measured_against": best,
                                         "baseline": {n: [before[n][0], after[n][0]] for n in before},
                                         "served": {str(c): s for c, s in rows}, "mean_batch": mean_batch}, indent=1))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
