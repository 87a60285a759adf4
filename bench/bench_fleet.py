#!/usr/bin/env python3
"""Routing policies of a fleet: --servers (3) `cortexstream serve` processes behind vllm-router,
one policy at a time (--policies, default round_robin,cache_aware,kv_aware; power_of_two too).

The servers run for the whole benchmark, each with --threads (1) compute threads, its own KV
events endpoint (kv_aware follows it, see docs/deploy.md) and --kv-cache-memory (256MiB). Before
each policy every server's prefix cache is emptied (POST /flush_cache, checked through its
/metrics) and a fresh router is started, so every policy starts cold. The routers check /health
every second and get a Prometheus port of their own.

Workload (seeded, the same for every policy): --groups (5) groups, each a shared ~--prefix-tokens
(800) token document (bench_prefix.py's prose documents: they differ from their first token on)
followed by --per-group (16) distinct short questions. The requests are interleaved across the
groups (one question of every group, in a seeded random order, then the next round) and sent by
--clients (6) concurrent clients in a closed loop (each sends its next request when the previous
one ends) as streamed /v1/completions through the router, temperature 0, ignore_eos, max_tokens
--max-tokens (32). A policy that sends each group to one server computes each document once; one
that spreads a group computes it once per server it lands on.

Reported per policy: fleet output tokens/s (completion tokens / wall time of the load), TTFT
p50/p99 and the other figures of bench_serve.py's summary, the fleet prefix hit rate (the sum over
the servers of the deltas of cortexstream:prefix_cache_hits_total over the sum of the deltas of
cortexstream:prefix_cache_queries_total, in tokens; the difference is the prompt tokens the fleet
computed), the requests each server finished, and the router's command line.

--quick: a small run (4 groups of 6 requests, 300-token documents, 3 clients, max_tokens 16).
--router-log-level debug makes vllm-router log each kv_aware decision (the server it chose, the
prompt tokens it credited as cached) in bench/out/fleet-router-kv_aware.log.

Prints one JSON object on stdout; progress goes to stderr; logs go to bench/out/fleet-*.log.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from bench_prefix import document, question_text
from bench_serve import (DEFAULT_BIN, DEFAULT_MODEL, OUT_DIR, ROOT, free_port, loadavg,
                         run_load, stop_server, summarize, wait_health, warm_up)
from llama_cpp_build import cpu_name, git_commit

try:
    import aiohttp
except ImportError:  # pragma: no cover - told to the user below
    aiohttp = None

POLICIES = ("round_robin", "cache_aware", "kv_aware", "power_of_two")
# Health checks every second (vllm-router's default is a minute); /get_load polled every second
# (power_of_two).
ROUTER_HEALTH = ["--health-check-interval-secs", "1", "--health-check-timeout-secs", "2",
                 "--health-failure-threshold", "3", "--health-success-threshold", "1",
                 "--worker-startup-check-interval", "1"]


def log(msg: str) -> None:
    print(f"[bench_fleet {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- HTTP helpers

def http(method: str, url: str, timeout: float = 10) -> tuple[int, str]:
    req = urllib.request.Request(url, data=b"" if method == "POST" else None, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def counters(base: str) -> dict[str, float]:
    """The prefix-cache counters, finished requests and cached blocks of one server."""
    out = {"hits": 0.0, "queries": 0.0, "finished": 0.0, "blocks_cached": 0.0}
    for line in http("GET", base + "/metrics")[1].splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        name = key.split("{", 1)[0]
        field = {"cortexstream:prefix_cache_hits_total": "hits",
                 "cortexstream:prefix_cache_queries_total": "queries",
                 "cortexstream:request_success_total": "finished",
                 "cortexstream:kv_cache_blocks_cached": "blocks_cached"}.get(name)
        if field:
            out[field] += float(value)
    return out


# ----------------------------------------------------------------------------- workload

def make_requests(args: argparse.Namespace) -> list[dict]:
    docs = [document(random.Random(f"fleet-{args.seed}-{g}"), args.prefix_tokens)
            for g in range(args.groups)]
    rng = random.Random(f"fleet-questions-{args.seed}")
    reqs = []
    for q in range(args.per_group):
        order = list(range(args.groups))
        rng.shuffle(order)  # so that no fixed rotation lines a group up with one server
        for g in order:
            reqs.append({"index": len(reqs), "group": g, "max_tokens": args.max_tokens,
                         "prompt": docs[g] + question_text(q, rng)})
    return reqs


# ----------------------------------------------------------------------------- processes

def start(cmd: list[str], log_path: Path) -> subprocess.Popen:
    with open(log_path, "wb") as logf:
        return subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def wait_router(base: str, proc: subprocess.Popen, n: int, log_path: Path, kv_aware: bool,
                timeout_s: float) -> None:
    """Until the router reports every worker healthy and, for kv_aware, has subscribed to every
    server's KV events."""
    deadline = time.time() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"router exited with status {proc.returncode} (see {log_path})")
        try:
            status, body = http("GET", base + "/readiness", timeout=2)
            ready = status == 200 and json.loads(body).get("healthy_workers") == n
        except (OSError, ValueError):
            ready = False
        if ready and kv_aware:
            ready = log_path.read_text(errors="replace").count("spawned subscriber") >= n
        if ready:
            return
        if time.time() > deadline:
            raise RuntimeError(f"router not ready after {timeout_s} s (see {log_path})")
        time.sleep(0.2)


def flush(bases: list[str]) -> None:
    """Empties every server's prefix cache and checks that it is empty."""
    for b in bases:
        status, body = http("POST", b + "/flush_cache")
        if status != 200:
            raise RuntimeError(f"{b}/flush_cache: HTTP {status} {body[:200]}")
    deadline = time.time() + 10
    while any(counters(b)["blocks_cached"] > 0 for b in bases):
        if time.time() > deadline:
            raise RuntimeError("cached blocks left after /flush_cache")
        time.sleep(0.1)


def run_policy(policy: str, router_bin: str, bases: list[str], reqs: list[dict],
               model_name: str, args: argparse.Namespace) -> dict:
    flush(bases)
    port = free_port()
    # CortexStream's KV cache is in host memory and its events say medium "CPU"; kv_aware
    # discounts that tier (0.8 by default) as if the blocks had to be moved to a device first.
    policy_args = ["--kv-penalty-host", str(args.kv_penalty_host)] if policy == "kv_aware" else []
    cmd = [router_bin, "--host", "127.0.0.1", "--port", str(port), "--policy", policy,
           *policy_args, "--prometheus-port", str(free_port()), *ROUTER_HEALTH,
           "--log-level", args.router_log_level, "--worker-urls", *bases]
    log_path = OUT_DIR / f"fleet-router-{policy}.log"
    log(f"{policy}: {' '.join(cmd)}  (log: {log_path.relative_to(ROOT)})")
    proc = start(cmd, log_path)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_router(base, proc, len(bases), log_path, policy == "kv_aware", 60)
        before = [counters(b) for b in bases]
        load_before = loadavg()
        results, wall = asyncio.run(run_load(base, model_name, reqs, args.clients,
                                             args.request_timeout))
        after = [counters(b) for b in bases]
    finally:
        stop_server(proc)
    s = summarize(results, wall)
    hits = sum(a["hits"] - b["hits"] for a, b in zip(after, before))
    queries = sum(a["queries"] - b["queries"] for a, b in zip(after, before))
    s.update({
        "prefix_hit_rate": round(hits / queries, 4) if queries else None,
        "prefix_cache_hits_tokens": hits, "prefix_cache_queries_tokens": queries,
        "prompt_tokens_computed": queries - hits,
        "requests_per_server": [int(a["finished"] - b["finished"]) for a, b in zip(after, before)],
        "loadavg_before": load_before, "loadavg_after": loadavg(),
        "router_command": cmd, "router_log": str(log_path.relative_to(ROOT)),
    })
    log(f"{policy}: {s['completed']} ok, {s['failed']} failed, {s['output_tokens_per_s']} output "
        f"tok/s, TTFT p50 {s['ttft_s_p50']} s p99 {s['ttft_s_p99']} s, hit rate "
        f"{s['prefix_hit_rate']}, per server {s['requests_per_server']}")
    return s


# ----------------------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help=f"GGUF model (default {DEFAULT_MODEL})")
    ap.add_argument("--bin", default=str(DEFAULT_BIN), help="cortexstream binary")
    ap.add_argument("--router-bin", default=os.environ.get("VLLM_ROUTER", "vllm-router"),
                    help="vllm-router executable (default vllm-router, or $VLLM_ROUTER)")
    ap.add_argument("--policies", default="round_robin,cache_aware,kv_aware",
                    help=f"vllm-router policies, in this order, among {', '.join(POLICIES)}")
    ap.add_argument("--servers", type=int, default=3, help="servers in the fleet (default 3)")
    ap.add_argument("--threads", type=int, default=1, help="compute threads per server")
    ap.add_argument("--kv-cache-memory", default="256MiB", help="KV pool per server")
    ap.add_argument("--groups", type=int, default=5, help="shared-prefix groups (default 5)")
    ap.add_argument("--per-group", type=int, default=16, help="requests per group (default 16)")
    ap.add_argument("--prefix-tokens", type=int, default=800,
                    help="tokens of each group's shared document (default 800)")
    ap.add_argument("--clients", type=int, default=6, help="concurrent clients (default 6)")
    ap.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every request")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kv-penalty-host", type=float, default=1.0,
                    help="kv_aware's credit for host-memory blocks (default 1.0: full credit, as "
                         "CortexStream's whole cache is in host memory; the router's own default "
                         "is 0.8)")
    ap.add_argument("--router-log-level", default="info",
                    help="vllm-router --log-level (debug logs each kv_aware decision)")
    ap.add_argument("--request-timeout", type=float, default=600)
    ap.add_argument("--startup-timeout", type=float, default=120)
    ap.add_argument("--quick", action="store_true",
                    help="a small run: 4 groups x 6 requests, 300-token documents, 3 clients, "
                         "max_tokens 16")
    args = ap.parse_args()
    if args.quick:
        args.groups, args.per_group, args.prefix_tokens = 4, 6, 300
        args.clients, args.max_tokens = 3, 16

    if aiohttp is None:
        print("bench_fleet.py needs aiohttp: python3 -m pip install -r bench/requirements.txt",
              file=sys.stderr)
        return 2
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if not policies or any(p not in POLICIES for p in policies) or \
            len(set(policies)) != len(policies):
        print(f"--policies {args.policies!r}: distinct names among {', '.join(POLICIES)}",
              file=sys.stderr)
        return 2
    router_bin = shutil.which(args.router_bin)
    if router_bin is None:
        print(f"{args.router_bin}: not found (pip install vllm-router, see "
              f"tests/python/requirements.txt)", file=sys.stderr)
        return 2
    model = Path(args.model) if args.model else DEFAULT_MODEL
    if not model.exists():
        print(f"{model}: not found (scripts/fetch_model.sh fetches the default model)",
              file=sys.stderr)
        return 2
    cs_bin = Path(args.bin)
    if not cs_bin.exists():
        print(f"{cs_bin}: not found (scripts/build.sh release cortexstream, or --bin)",
              file=sys.stderr)
        return 2
    model_name = model.name
    reqs = make_requests(args)
    OUT_DIR.mkdir(parents=True, exist_ok=True)

    report: dict = {
        "bench": "fleet",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": {"cpu": cpu_name(), "cores": os.cpu_count(), "loadavg_start": loadavg()},
        "cortexstream_commit": git_commit(),
        "model": str(model.relative_to(ROOT) if model.is_relative_to(ROOT) else model),
        "fleet": {"servers": args.servers, "threads_per_server": args.threads,
                  "kv_cache_memory": args.kv_cache_memory, "router": "vllm-router",
                  "router_version": router_version(router_bin)},
        "load": {"groups": args.groups, "per_group": args.per_group,
                 "requests": len(reqs), "prefix_tokens_target": args.prefix_tokens,
                 "clients": args.clients, "max_tokens": args.max_tokens, "seed": args.seed,
                 "order": "interleaved across groups", "endpoint": "/v1/completions",
                 "stream": True, "temperature": 0, "ignore_eos": True},
        "policies": {},
    }

    procs: list[subprocess.Popen] = []
    failed = []
    try:
        bases = []
        for i in range(args.servers):
            port = free_port()
            cmd = [str(cs_bin), "serve", "--model", str(model), "--host", "127.0.0.1",
                   "--port", str(port), "--threads", str(args.threads),
                   "--kv-cache-memory", args.kv_cache_memory,
                   "--max-num-seqs", str(max(4, args.clients)),
                   "--kv-events-endpoint", f"tcp://127.0.0.1:{free_port()}"]
            log_path = OUT_DIR / f"fleet-server-{i}.log"
            log(f"server {i}: {' '.join(cmd)}  (log: {log_path.relative_to(ROOT)})")
            procs.append(start(cmd, log_path))
            bases.append(f"http://127.0.0.1:{port}")
        for base, proc in zip(bases, procs):
            wait_health(base, proc, args.startup_timeout)
            asyncio.run(warm_up(base, model_name))
        report["fleet"]["server_urls"] = bases
        for policy in policies:
            try:
                report["policies"][policy] = run_policy(policy, router_bin, bases, reqs,
                                                        model_name, args)
            except (RuntimeError, OSError) as e:
                log(f"{policy}: {type(e).__name__}: {e}")
                report["policies"][policy] = {"error": f"{type(e).__name__}: {e}"}
                failed.append(policy)
    finally:
        for proc in procs:
            stop_server(proc)
    report["host"]["loadavg_end"] = loadavg()
    print(json.dumps(report, indent=1))
    return 1 if failed else 0


def router_version(router_bin: str) -> str | None:
    """The installed vllm-router package's version (the executable has no --version)."""
    try:
        from importlib.metadata import version
        return version("vllm-router")
    except Exception:  # noqa: BLE001 - only informative
        return None


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
