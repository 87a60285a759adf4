#!/usr/bin/env python3
"""How many requests a KV pool of fixed size runs at once, per KV storage type (and, for models
with sliding-window layers, with and without the hybrid cache).

For each configuration (--configs, default "f16,q8"; a name is a --kv-dtype, with "+nohybrid"
appended for --no-hybrid-kv, or "+window=W:S" for requests with kv_window W and kv_sinks S:
attention sinks + a sliding window) one `cortexstream serve --kv-cache-memory --pool` starts, and
--requests requests of --prompt-words words of seeded random text with max_tokens --max-tokens
(ignore_eos, temperature 0) are sent all at once. While they run, /metrics is polled every 20 ms:
the peak of cortexstream:num_requests_running is what the pool held at once (the scheduler admits
while blocks last, and the request cap, --max-num-seqs 256, is never the limit here). Also
reported: the preemptions the pool forced, the wall time and output tokens/s of the whole batch.

  python3 bench/bench_kv_capacity.py [--model M] [--pool 32MiB] [--requests 32]
                                     [--prompt-words 150] [--max-tokens 64] [--configs f16,q8]

Prints one JSON object on stdout.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_BIN = REPO / "build" / "src" / "cli" / "cortexstream"
DEFAULT_MODEL = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
WORDS = ("the of and a to in is was it for on that with as by at from his an were are which "
         "this be or has had one first new after two year also its their been who city time "
         "people river school world state team war house light music water stone garden").split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read().decode()


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def run_config(args: argparse.Namespace, config: str, prompts: list[str]) -> dict:
    dtype, _, rest = config.partition("+")
    flags = ["--kv-dtype", dtype] + (["--no-hybrid-kv"] if rest == "nohybrid" else [])
    window = {}
    if rest.startswith("window="):
        w, _, sinks = rest[len("window="):].partition(":")
        window = {"kv_window": int(w), "kv_sinks": int(sinks or 0)}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([args.bin, "serve", "--model", args.model, "--port", str(port),
                             "--kv-cache-memory", args.pool, "--max-num-seqs", "256",
                             "--no-prefix-caching", *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while True:
            try:
                get(url + "/health")
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"{config}: server did not start")
                time.sleep(0.1)
        max_len = json.loads(get(url + "/v1/models"))["data"][0]["max_model_len"]
        peak = 0.0
        stop = threading.Event()

        def poll() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, metric(get(url + "/metrics"), "cortexstream:num_requests_running"))
                time.sleep(0.02)

        poller = threading.Thread(target=poll)
        poller.start()
        t0 = time.time()
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as ex:
            results = list(ex.map(lambda p: post(url + "/v1/completions", {
                "model": "m", "prompt": p, "max_tokens": args.max_tokens, "temperature": 0,
                "ignore_eos": True, **window}), prompts))
        wall = time.time() - t0
        stop.set()
        poller.join()
        text = get(url + "/metrics")
        out_tokens = sum(r["usage"]["completion_tokens"] for r in results)
        return {"config": config, "max_model_len": max_len, "peak_running": int(peak),
                "preemptions": int(metric(text, "cortexstream:num_preemptions_total")),
                "kv_blocks": int(metric(text, "cortexstream:kv_cache_blocks_total")),
                "prompt_tokens_mean": sum(r["usage"]["prompt_tokens"] for r in results) /
                len(results),
                "wall_s": wall, "output_tokens_per_s": out_tokens / wall}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", default=str(DEFAULT_BIN))
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--pool", default="32MiB", help="--kv-cache-memory of every server")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-words", type=int, default=150)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--configs", default="f16,q8")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(args.prompt_words))
               for _ in range(args.requests)]
    rows = []
    for config in args.configs.split(","):
        print(f"running {config}", file=sys.stderr)
        rows.append(run_config(args, config, prompts))
    print(json.dumps({"bench": "kv_capacity", "model": os.path.relpath(args.model, REPO),
                      "pool": args.pool, "requests": args.requests,
                      "prompt_words": args.prompt_words, "max_tokens": args.max_tokens,
                      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                      "results": rows}, indent=1))


if __name__ == "__main__":
    main()
