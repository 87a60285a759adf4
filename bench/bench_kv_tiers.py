#!/usr/bin/env python3
"""Time to first token of one long prompt (~--prompt-tokens, 4,000) from each place its KV can
come from, in one run on one machine:

  cold         computed from scratch by a server with no tiers (--kv-offload-dir/--kv-redis off)
  cold+tiers   computed from scratch by a server that writes every block through to a disk tier
               and Redis as it computes them (what write-through costs the first request)
  pool         the same prompt again on that server: a prefix-cache hit in the pool
  disk         the same prompt after POST /reset_prefix_cache (the pool forgot): loaded back from
               the disk tier
  redis        the same prompt on a second server that shares only the Redis tier and never saw
               it: loaded from Redis

Each of --repeats (3) rounds uses a fresh prompt (a per-round tag opens it, so not even its first
block was seen before), max_tokens 1, temperature 0, streamed from /v1/completions; the reported
TTFT is the median over rounds, with every sample, and each scenario's ratio to `cold`. The
scenarios of a round run back to back, so they see the same machine load. A redis-server is
started on a free loopback port for the run; the disk tier lives in a temporary folder.

  python3 bench/bench_kv_tiers.py [--bin B] [--model M] [--prompt-tokens 4000] [--repeats 3]

Prints one JSON object on stdout; progress and server logs go to stderr and bench/out/.
"""
from __future__ import annotations

import argparse
import datetime
import http.client
import json
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench_serve import (DEFAULT_BIN, DEFAULT_MODEL, OUT_DIR, SENTENCES, free_port, log,
                         stop_server, wait_health)


def ttft(port: int, prompt: str) -> tuple[float, int, int]:
    """(seconds to the first streamed token, cached prompt tokens, prompt tokens)."""
    body = json.dumps({"prompt": prompt, "max_tokens": 1, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    first = None
    cached = -1
    tokens = 0
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if first is None and chunk.get("choices") and chunk["choices"][0].get("text"):
            first = time.perf_counter() - start
        if chunk.get("usage"):
            cached = chunk["usage"]["prompt_tokens_details"]["cached_tokens"]
            tokens = chunk["usage"]["prompt_tokens"]
    conn.close()
    return (first if first is not None else time.perf_counter() - start), cached, tokens


def post(port: int, path: str) -> None:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=b"", method="POST")
    urllib.request.urlopen(req, timeout=60).read()


def metrics(port: int) -> dict[str, float]:
    out = {}
    for line in urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def wait_written(port: int) -> None:
    """Until write-through has nothing queued."""
    while any(v > 0 for k, v in metrics(port).items() if "kv_tier_pending_store_bytes" in k):
        time.sleep(0.05)


def make_prompt(round_: int, tokens: int) -> str:
    rng = random.Random(round_)
    words = [f"[doc {round_}-{rng.randrange(10**9)}]"]
    # ~1.13 tokens per word for this prose (bench_serve.py).
    while len(" ".join(words).split()) * 1.13 < tokens:
        words.append(rng.choice(SENTENCES))
    return " ".join(words)


def start(name: str, args: argparse.Namespace, *extra: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    logf = open(OUT_DIR / f"kv-tiers-{name}.log", "w")
    cmd = [str(args.bin), "serve", "--model", str(args.model), "--port", str(port),
           "--kv-cache-memory", "1GiB", *extra]
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT)
    wait_health(f"http://127.0.0.1:{port}", proc, 120)
    ttft(port, "Warm up the server.")
    return proc, port


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bin", type=Path, default=DEFAULT_BIN)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--prompt-tokens", type=int, default=4000)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    redis_bin = shutil.which("redis-server")
    if redis_bin is None:
        sys.exit("redis-server is missing (scripts/install_deps.sh installs it)")
    redis_port = free_port()
    redis = subprocess.Popen([redis_bin, "--port", str(redis_port), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    folder = Path(tempfile.mkdtemp(prefix="cs-kv-tiers-"))
    url = f"redis://127.0.0.1:{redis_port}"
    procs = []
    prompt_tokens = 0
    samples: dict[str, list[float]] = {k: [] for k in ("cold", "cold+tiers", "pool", "disk", "redis")}
    cached: dict[str, list[int]] = {k: [] for k in samples}
    try:
        plain = start("plain", args)
        procs.append(plain[0])
        tiered = start("tiered", args, "--kv-offload-dir", str(folder), "--kv-offload-size", "8GiB",
                       "--kv-redis", url)
        procs.append(tiered[0])
        reader = start("redis-reader", args, "--kv-redis", url)
        procs.append(reader[0])
        for r in range(args.repeats):
            prompt = make_prompt(r, args.prompt_tokens)
            for name, port in (("cold", plain[1]), ("cold+tiers", tiered[1]), ("pool", tiered[1])):
                t, c, prompt_tokens = ttft(port, prompt)
                samples[name].append(t)
                cached[name].append(c)
            wait_written(tiered[1])
            post(tiered[1], "/reset_prefix_cache")
            for name, port in (("disk", tiered[1]), ("redis", reader[1])):
                t, c, _ = ttft(port, prompt)
                samples[name].append(t)
                cached[name].append(c)
            log(f"round {r}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in samples.items()))
    finally:
        for proc in procs:
            stop_server(proc)
        redis.kill()
        redis.wait()
        shutil.rmtree(folder, ignore_errors=True)

    cold = statistics.median(samples["cold"])
    out = {
        "benchmark": "kv_tiers_ttft",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "cores": subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()},
        "model": args.model.name,
        "prompt_tokens": prompt_tokens,
        "repeats": args.repeats,
        "scenarios": {
            k: {"ttft_s_median": round(statistics.median(v), 4),
                "ttft_s": [round(x, 4) for x in v],
                "cached_tokens": cached[k],
                "ratio_to_cold": round(statistics.median(v) / cold, 4)}
            for k, v in samples.items()
        },
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
