#!/usr/bin/env python3
"""Serving load test: `cortexstream serve` next to llama.cpp's `llama-server` and, optionally, vLLM.

Servers (--servers, in the order they run; default cortex,llama): `cortex` is `cortexstream
serve`, `llama` is llama.cpp's `llama-server` on the same GGUF file, `vllm` is vLLM's CPU
OpenAI-compatible server on a dense bfloat16 copy of that file (bench/vllm_peer.py makes its
virtualenv and the copy on first use; --with-vllm adds it to the list).

N concurrent clients (closed loop: each sends its next request when the previous one ends)
stream `/v1/completions` (`stream: true`, temperature 0, `ignore_eos: true` on every server, so
every request generates exactly its `max_tokens`) from one seeded request list, identical for
all servers:

  prompt length  log-normal, median --prompt-median (100) tokens, sigma --prompt-sigma (0.8),
                 capped at --prompt-max (800); the text is sentences drawn at random (seeded)
                 from the prose below, so prompts share no long prefix (llama-server's prompt
                 cache cannot help much; its cached-token count is reported anyway)
  max_tokens     log-normal, median --output-median (64), sigma --output-sigma (0.8), capped at
                 --output-max (256)

A sigma of 0 makes every request the same length (the median). Prompt lengths are targeted in
words (TOKENS_PER_WORD below, measured with this model's tokenizer); the prompt tokens each server
actually counted are reported from `usage`.

One server runs at a time (they would fight over the same cores): start, wait for /health, two
warm-up requests, the load, SIGTERM. Per server: aggregate output tokens/s (completion tokens of
all completed requests / wall time of the load), TTFT, TPOT = (latency - TTFT) / (output tokens - 1)
per request, request latency (p50/p99 each), completed/failed counts and total tokens; then the
ratios cortexstream / each other server. Output tokens are the server's own
`usage.completion_tokens`.

When the llama-server binary is missing, the script fetches the llama-cpp-python sdist pinned in
bench/requirements.txt (it vendors llama.cpp) into bench/.cache and builds the `llama-server`
target (Release, GGML_NATIVE=ON, LLAMA_CURL=OFF): several minutes on two cores.

Prints one JSON object on stdout; progress goes to stderr; server logs go to bench/out/.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from llama_cpp_build import build_llama_tool, cpu_name, default_tool_path, git_commit, llama_info
import vllm_peer

try:
    import aiohttp
except ImportError:  # pragma: no cover - told to the user below
    aiohttp = None

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_BIN = ROOT / "build" / "src" / "cli" / "cortexstream"
OUT_DIR = ROOT / "bench" / "out"
DEFAULT_LLAMA_BIN = default_tool_path("llama-server")

# SmolLM2's tokenizer on the prose below: 1.13 tokens per whitespace-separated word (measured
# with `cortexstream tokenize` on the whole text). Only used to aim prompt lengths.
TOKENS_PER_WORD = 1.13
PROMPT_SUFFIX = "\n\nWrite a short continuation of the passage above."

# Plain prose written for this benchmark (no special-token text). Sentences are drawn from it at
# random to build prompts.
PROSE = """
The river came down from the hills in the spring, brown and loud, and the people of the valley
watched it from the bridge as their grandparents had done. Every year someone said the water
had never been so high, and every year the old miller shook his head and pointed at the marks
cut into the stone of his wall. The highest mark was older than anyone living, and beside it
someone had carved a date that the weather had nearly worn away.

In the town below the bridge there was a market on Thursdays. Farmers brought cheese, apples
and wool, and merchants from the coast brought salt, dried fish and news. The news was always a
week old and often wrong, but it was listened to more carefully than anything else that was
sold. A traveller who could tell a good story was given a free meal at the inn, and a traveller
who could tell a true one was given a bed as well.

The schoolmaster kept a small library in the back room of the schoolhouse. Most of the books
were about arithmetic, geography and the lives of generals, but a few were novels that had been
left behind by visitors, and these were the ones the children read under their desks. One of
them described a city where the streets were lit all night by lamps that needed no oil, and the
children argued for weeks about whether such a place could exist.

Winter arrived early that year. The first snow fell in the middle of October, before the last
of the potatoes had been dug, and the farmers worked with lanterns in the frozen fields. The
blacksmith's forge became the warmest place in the valley, and men gathered there in the
evenings to talk about prices, the weather and the new road that the government had promised to
build. Nobody believed the road would ever come, but everyone had an opinion about where it
should go.

A young engineer came in the spring to survey the route. She carried a brass instrument on a
wooden tripod and a notebook full of numbers, and she walked the hills for a month, measuring
angles and writing down the heights of things. The children followed her at a distance, and the
bravest of them asked what the numbers were for. She explained that a road has to climb gently,
because a horse pulling a loaded cart can only manage so steep a slope, and that the numbers told
her where the slope would be kind enough.

The road took three summers to build. Crews of workers lived in tents along the route, and the
inn was full every night for the first time in memory. The miller sold more flour than he could
grind, and the market grew so large that it spilled out of the square and along the riverbank.
When the road was finished, a coach began to run twice a week to the coast, and the news that
arrived at the market was only two days old.

Not everyone welcomed the change. Some of the older farmers complained that the town was
becoming noisy and that strangers no longer greeted people in the street. The schoolmaster
worried that the children would leave for the cities as soon as they were old enough, and some
of them did. But others came to take their place: a doctor, a printer, a clockmaker and a family
who opened a shop that sold nothing but paper, ink and pens.

The printer started a weekly newspaper. It was four pages long and printed on a hand press in a
room that smelled of oil and damp paper. The first issue contained a report on the price of
wool, a notice about a lost dog, a poem by the schoolmaster and a long letter from the miller
about the height of the river. The newspaper sold out in an hour, and the printer had to print a
second run the next morning.

Years later, when a railway line was proposed through the valley, the newspaper printed maps,
arguments and letters for months. The engineer who had built the road was now old, and she wrote
a careful article explaining how much a railway could carry and how little it would cost to move
a ton of grain compared with a cart. Her numbers convinced the town council, and the station was
built on the flat ground beside the river, just below the miller's wall.

On the day the first train arrived, the whole valley came to watch. The engine was black and
green, with brass fittings that shone in the sun, and it breathed steam like an animal. Children
climbed onto their parents' shoulders, and the old miller, who was very old indeed by then, stood
on the bridge where he had watched the floods and said that he had never seen anything so fast.
The train stayed for ten minutes, then whistled and went on towards the coast, and the people
walked home slowly, talking about where they might go now that the world had come so close.
"""

SENTENCES = [s.strip() for s in re.split(r"(?<=[.!?])\s+", " ".join(PROSE.split())) if s.strip()]


def log(msg: str) -> None:
    print(f"[bench_serve {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- request list

def lognormal_int(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return max(lo, min(hi, int(round(rng.lognormvariate(math.log(median), sigma)))))


def make_requests(n: int, seed: int, args: argparse.Namespace) -> list[dict]:
    rng = random.Random(seed)
    reqs = []
    for i in range(n):
        target = lognormal_int(rng, args.prompt_median, args.prompt_sigma, 8, args.prompt_max)
        max_tokens = lognormal_int(rng, args.output_median, args.output_sigma, 2, args.output_max)
        words_wanted = max(1, int(round(target / TOKENS_PER_WORD)))
        words: list[str] = []
        while len(words) < words_wanted:
            words.extend(rng.choice(SENTENCES).split())
        prompt = " ".join(words[:words_wanted]) + PROMPT_SUFFIX
        reqs.append({"index": i, "prompt": prompt, "target_prompt_tokens": target,
                     "max_tokens": max_tokens})
    return reqs


# ----------------------------------------------------------------------------- statistics

def percentile(values: list[float], p: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * p / 100.0
    f = math.floor(k)
    c = min(f + 1, len(v) - 1)
    return v[f] + (v[c] - v[f]) * (k - f)


def rnd(x: float | None, nd: int = 4):
    return None if x is None else round(x, nd)


# ----------------------------------------------------------------------------- load generator

async def sse_payloads(resp: "aiohttp.ClientResponse"):
    """The `data:` payloads of a streamed OpenAI response as they arrive: (arrival time, parsed
    JSON), and (arrival time, None) for `data: [DONE]`."""
    buf = b""
    async for data in resp.content.iter_any():
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            now = time.perf_counter()
            yield now, None if payload == b"[DONE]" else json.loads(payload)


async def one_request(session: "aiohttp.ClientSession", url: str, body: dict,
                      timeout_s: float, need_usage: bool = True) -> dict:
    """One streamed request to /v1/completions or /v1/chat/completions. TTFT is the time to the
    first chunk with non-empty text (`text`, or `delta.content` for chat); for an empty answer,
    the time to the chunk with its finish_reason. need_usage: a stream without a usage chunk
    (stream_options.include_usage) counts as failed."""
    res = {"ok": False, "ttft_s": None, "latency_s": None, "text": "", "chunks": 0,
           "prompt_tokens": None, "completion_tokens": None, "cached_tokens": None,
           "llama_cache_n": None, "llama_prompt_n": None, "finish_reason": None, "error": None}
    t0 = time.perf_counter()
    first_end = None
    try:
        async with session.post(url, json=body,
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            if resp.status != 200:
                res["error"] = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return res
            done = False
            async for now, obj in sse_payloads(resp):
                if obj is None:
                    done = True
                    continue
                if "error" in obj:
                    res["error"] = f"stream error: {json.dumps(obj['error'])[:300]}"
                    return res
                for ch in obj.get("choices") or []:
                    res["chunks"] += 1
                    piece = ch.get("text")
                    if piece is None:
                        piece = (ch.get("delta") or {}).get("content")
                    if piece:
                        if res["ttft_s"] is None:
                            res["ttft_s"] = now - t0
                        res["text"] += piece
                    if ch.get("finish_reason"):
                        res["finish_reason"] = ch["finish_reason"]
                        if first_end is None:
                            first_end = now
                usage = obj.get("usage")
                if usage:
                    res["completion_tokens"] = usage.get("completion_tokens")
                    res["prompt_tokens"] = usage.get("prompt_tokens")
                    details = usage.get("prompt_tokens_details") or {}
                    if details.get("cached_tokens") is not None:
                        res["cached_tokens"] = details["cached_tokens"]
                timings = obj.get("timings")  # llama-server
                if isinstance(timings, dict):
                    res["llama_cache_n"] = timings.get("cache_n", res["llama_cache_n"])
                    res["llama_prompt_n"] = timings.get("prompt_n", res["llama_prompt_n"])
            res["latency_s"] = time.perf_counter() - t0
            if res["ttft_s"] is None and first_end is not None:
                res["ttft_s"] = first_end - t0  # an empty answer: the time to its end
            if not done:
                res["error"] = "stream ended without [DONE]"
            elif need_usage and res["completion_tokens"] is None:
                res["error"] = "no usage in the stream"
            elif res["ttft_s"] is None:
                res["error"] = "no completion chunk"
            else:
                res["ok"] = True
    except asyncio.TimeoutError:
        res["error"] = f"timeout after {timeout_s} s"
    except Exception as e:  # noqa: BLE001 - a failed request is counted, not fatal
        res["error"] = f"{type(e).__name__}: {e}"
    return res


def request_body(req: dict, model_name: str) -> dict:
    return {"model": model_name, "prompt": req["prompt"], "max_tokens": req["max_tokens"],
            "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}


async def run_load(base: str, model_name: str, reqs: list[dict], clients: int,
                   timeout_s: float) -> tuple[list[dict], float]:
    url = base + "/v1/completions"
    queue: asyncio.Queue = asyncio.Queue()
    for r in reqs:
        queue.put_nowait(r)
    results: list[dict | None] = [None] * len(reqs)
    # One connection per request: llama-server closes a connection after a streamed response
    # (a reused keep-alive connection then fails to write the next request body).
    conn = aiohttp.TCPConnector(limit=clients, force_close=True)
    async with aiohttp.ClientSession(connector=conn) as session:
        async def worker() -> None:
            while True:
                try:
                    r = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                out = await one_request(session, url, request_body(r, model_name), timeout_s)
                out["index"] = r["index"]
                out["max_tokens"] = r["max_tokens"]
                results[r["index"]] = out
                if not out["ok"]:
                    log(f"  request {r['index']} failed: {out['error']}")

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    return [r for r in results if r is not None], wall


async def warm_up(base: str, model_name: str, n: int = 2) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        for i in range(n):
            body = request_body({"prompt": f"{SENTENCES[i]}{PROMPT_SUFFIX}", "max_tokens": 8},
                                model_name)
            out = await one_request(session, base + "/v1/completions", body, 120)
            if not out["ok"]:
                raise RuntimeError(f"warm-up request failed: {out['error']}")


def summarize(results: list[dict], wall: float) -> dict:
    ok = [r for r in results if r["ok"]]
    ttft = [r["ttft_s"] for r in ok]
    lat = [r["latency_s"] for r in ok]
    tpot = [(r["latency_s"] - r["ttft_s"]) / (r["completion_tokens"] - 1)
            for r in ok if r["completion_tokens"] >= 2]
    out_tok = sum(r["completion_tokens"] for r in ok)
    prompt_tok = [r["prompt_tokens"] for r in ok if r["prompt_tokens"] is not None]
    cached = [r["cached_tokens"] for r in ok if r["cached_tokens"] is not None]
    finish = {}
    for r in ok:
        finish[r["finish_reason"]] = finish.get(r["finish_reason"], 0) + 1
    errors = sorted({r["error"] for r in results if not r["ok"]})
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "wall_s": rnd(wall, 3),
        "output_tokens_total": out_tok,
        "output_tokens_requested_completed": sum(r["max_tokens"] for r in ok),
        "prompt_tokens_total": sum(prompt_tok),
        "prompt_tokens_p50": percentile(prompt_tok, 50),
        "prompt_tokens_max": max(prompt_tok) if prompt_tok else None,
        "prompt_tokens_cached_total": sum(cached) if cached else None,
        "output_tokens_per_s": rnd(out_tok / wall if wall > 0 else None, 2),
        "requests_per_s": rnd(len(ok) / wall if wall > 0 else None, 3),
        "ttft_s_p50": rnd(percentile(ttft, 50)),
        "ttft_s_p99": rnd(percentile(ttft, 99)),
        "tpot_s_p50": rnd(percentile(tpot, 50), 5),
        "tpot_s_p99": rnd(percentile(tpot, 99), 5),
        "latency_s_p50": rnd(percentile(lat, 50)),
        "latency_s_p99": rnd(percentile(lat, 99)),
        "finish_reasons": finish,
        "errors": errors[:5],
    }


# ----------------------------------------------------------------------------- servers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_health(base: str, proc: subprocess.Popen, timeout_s: float) -> None:
    async def poll() -> bool:
        async with aiohttp.ClientSession() as session:
            try:
                async with session.get(base + "/health",
                                       timeout=aiohttp.ClientTimeout(total=2)) as r:
                    return r.status == 200
            except (aiohttp.ClientError, asyncio.TimeoutError):
                return False

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode} before /health")
        if asyncio.run(poll()):
            return
        time.sleep(0.3)
    raise RuntimeError(f"server not healthy after {timeout_s} s")


def stop_server(proc: subprocess.Popen) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            log("  server ignored SIGTERM for 60 s; killing its process group")
            proc.kill()
            proc.wait()
    # The server runs in a session of its own (start_new_session): whatever it started and left
    # behind (vLLM runs its engine in child processes) goes too.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    return proc.returncode


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def bench_server(name: str, cmd: list[str], port: int, reqs: list[dict],
                 args: argparse.Namespace, model_name: str, env: dict | None = None,
                 startup_timeout: float | None = None) -> dict:
    """Starts one server (`env`: variables added to this process's environment), loads it with
    `reqs` and stops it."""
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    log_path = OUT_DIR / f"serve-{name}.log"
    env_text = " ".join(f"{k}={v}" for k, v in (env or {}).items())
    log(f"{name}: {env_text + ' ' if env_text else ''}{' '.join(cmd)}  "
        f"(log: {log_path.relative_to(ROOT)})")
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as logf:
        t_start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                env=dict(os.environ, **env) if env else None)
        try:
            wait_health(base, proc, startup_timeout or args.startup_timeout)
            startup = time.perf_counter() - t_start
            asyncio.run(warm_up(base, model_name))
            load_before = loadavg()
            log(f"{name}: healthy after {startup:.1f} s, warmed up; {len(reqs)} requests, "
                f"{args.clients} clients")
            results, wall = asyncio.run(run_load(base, model_name, reqs, args.clients,
                                                 args.request_timeout))
            load_after = loadavg()
        finally:
            rc = stop_server(proc)
    s = summarize(results, wall)
    s.update({"command": cmd, "env": env or {}, "startup_s": round(startup, 2), "exit_status": rc,
              "loadavg_before": load_before, "loadavg_after": load_after,
              "log": str(log_path.relative_to(ROOT))})
    log(f"{name}: {s['completed']} ok, {s['failed']} failed, {s['output_tokens_per_s']} output "
        f"tok/s, TTFT p50 {s['ttft_s_p50']} s, TPOT p50 {s['tpot_s_p50']} s")
    if args.per_request:
        s["requests"] = results
    return s


# ----------------------------------------------------------------------------- main

# flag name -> JSON key; cortex-mlx is CortexStream served with --backend mlx
SERVERS = {"cortex": "cortexstream", "cortex-mlx": "cortexstream-mlx", "llama": "llama",
           "vllm": "vllm"}


def parse_servers(args: argparse.Namespace) -> list[str] | str:
    """The servers to run, in order, from --servers, --with-vllm, --skip-llama and --order;
    or an error message."""
    names = [n.strip() for n in args.servers.split(",") if n.strip()]
    unknown = [n for n in names if n not in SERVERS]
    if unknown or not names or len(set(names)) != len(names):
        return f"--servers {args.servers!r}: a list of distinct names among {', '.join(SERVERS)}"
    if args.with_vllm and "vllm" not in names:
        names.append("vllm")
    if args.skip_llama:
        names = [n for n in names if n != "llama"]
    if args.order == "llama-first" and "llama" in names:
        names = ["llama"] + [n for n in names if n != "llama"]
    return names or "no server left to run"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help=f"GGUF model (default {DEFAULT_MODEL})")
    ap.add_argument("--servers", default="cortex,llama",
                    help="servers to run, in this order, among cortex, cortex-mlx (--backend "
                         "mlx), llama, vllm "
                         "(default cortex,llama)")
    ap.add_argument("--with-vllm", action="store_true",
                    help="add vllm to --servers (its venv and model folder are made in "
                         "bench/.cache on first use, see bench/vllm_peer.py)")
    ap.add_argument("--skip-llama", action="store_true", help="take llama out of --servers")
    ap.add_argument("--bin", default=str(DEFAULT_BIN), help="cortexstream binary")
    ap.add_argument("--llama-server-bin", default=str(DEFAULT_LLAMA_BIN),
                    help="llama-server binary (built into bench/.cache when missing at the "
                         "default path)")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    ap.add_argument("--requests", type=int, default=64, help="requests in total (default 64)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the request list")
    ap.add_argument("--threads", type=int, default=2,
                    help="compute threads of each server (vLLM: its OpenMP threads, bound to "
                         "cores 0..threads-1)")
    ap.add_argument("--prompt-median", type=float, default=100, help="prompt tokens, median")
    ap.add_argument("--prompt-sigma", type=float, default=0.8,
                    help="sigma of the log-normal prompt length (0: all at the median)")
    ap.add_argument("--prompt-max", type=int, default=800)
    ap.add_argument("--output-median", type=float, default=64, help="max_tokens, median")
    ap.add_argument("--output-sigma", type=float, default=0.8,
                    help="sigma of the log-normal max_tokens (0: all at the median)")
    ap.add_argument("--output-max", type=int, default=256)
    ap.add_argument("--llama-args", default="",
                    help="extra llama-server arguments, e.g. '--poll 0' (its threads then sleep "
                         "instead of spinning while waiting for work)")
    ap.add_argument("--vllm-args", default="",
                    help="extra arguments of vLLM's server, e.g. '--enforce-eager'")
    ap.add_argument("--order", choices=["cortex-first", "llama-first"], default="cortex-first",
                    help="llama-first: run llama before the others (servers otherwise run in "
                         "--servers order)")
    ap.add_argument("--request-timeout", type=float, default=600)
    ap.add_argument("--startup-timeout", type=float, default=180)
    ap.add_argument("--vllm-startup-timeout", type=float, default=900,
                    help="vLLM compiles its model at start-up: minutes on 2 cores")
    ap.add_argument("--per-request", action="store_true",
                    help="include every request's measurements in the JSON")
    args = ap.parse_args()

    if aiohttp is None:
        print("bench_serve.py needs aiohttp: python3 -m pip install -r bench/requirements.txt",
              file=sys.stderr)
        return 2
    servers = parse_servers(args)
    if isinstance(servers, str):
        print(servers, file=sys.stderr)
        return 2
    model = Path(args.model) if args.model else DEFAULT_MODEL
    if not model.exists():
        print(f"{model}: not found (scripts/fetch_model.sh fetches the default model)",
              file=sys.stderr)
        return 2
    model_name = model.name  # the `model` field of every request, on every server
    cs_bin = Path(args.bin)
    if "cortex" in servers and not cs_bin.exists():
        print(f"{cs_bin}: not found (scripts/build.sh release cortexstream, or --bin)",
              file=sys.stderr)
        return 2

    reqs = make_requests(args.requests, args.seed, args)
    # Per-slot context of llama-server: the longest prompt plus its output plus slack (the word
    # based prompt length is an estimate). vLLM gets it as --max-model-len.
    slot_ctx = int(args.prompt_max * 1.25) + args.output_max + 64
    slot_ctx = (slot_ctx + 255) // 256 * 256

    report: dict = {
        "bench": "serve",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": {"cpu": cpu_name(), "cores": os.cpu_count(), "loadavg_start": loadavg()},
        "cortexstream_commit": git_commit(),
        "model": str(model.relative_to(ROOT) if model.is_relative_to(ROOT) else model),
        "servers_run": [SERVERS[n] for n in servers],
        "load": {
            "clients": args.clients, "requests": args.requests, "seed": args.seed,
            "endpoint": "/v1/completions", "stream": True, "temperature": 0, "ignore_eos": True,
            "prompt_tokens_target": {"distribution": "lognormal", "median": args.prompt_median,
                                     "sigma": args.prompt_sigma, "max": args.prompt_max,
                                     "p50": percentile([r["target_prompt_tokens"] for r in reqs], 50),
                                     "sum": sum(r["target_prompt_tokens"] for r in reqs)},
            "prompt_words_p50": percentile([len(r["prompt"].split()) for r in reqs], 50),
            "max_tokens": {"distribution": "lognormal", "median": args.output_median,
                           "sigma": args.output_sigma, "max": args.output_max,
                           "p50": percentile([r["max_tokens"] for r in reqs], 50),
                           "max_seen": max(r["max_tokens"] for r in reqs),
                           "sum": sum(r["max_tokens"] for r in reqs)},
            "threads": args.threads, "order": ",".join(servers),
        },
        "servers": {},
    }

    llama_bin = Path(args.llama_server_bin)
    if "llama" in servers:
        if not llama_bin.exists():
            if llama_bin.resolve() != DEFAULT_LLAMA_BIN.resolve():
                print(f"{llama_bin}: not found", file=sys.stderr)
                return 2
            try:
                report["llama_build"] = build_llama_tool("llama-server")
            except (subprocess.CalledProcessError, RuntimeError, OSError) as e:
                print(f"building llama-server failed: {e} (use --skip-llama to measure "
                      f"without it)", file=sys.stderr)
                return 3
        report["llama_cpp"] = dict(llama_info(llama_bin), slot_ctx=slot_ctx)
    else:
        report["llama_cpp"] = "not run (--servers)"

    if "vllm" in servers:
        try:
            report["vllm"] = vllm_peer.ensure_vllm(model)
        except (subprocess.CalledProcessError, RuntimeError, OSError) as e:
            print(f"preparing vLLM failed: {e} (see bench/vllm_peer.py; leave vllm out of "
                  f"--servers to measure without it)", file=sys.stderr)
            return 3
        report["vllm"]["max_model_len"] = slot_ctx
    else:
        report["vllm"] = "not run (--servers)"

    def run_cortex(backend: str = "cpu") -> None:
        port = free_port()
        cmd = [str(cs_bin), "serve", "--model", str(model), "--host", "127.0.0.1", "--port",
               str(port), "--max-num-seqs", str(args.clients), "--threads", str(args.threads),
               "--backend", backend]
        key = "cortexstream" if backend == "cpu" else "cortexstream-mlx"
        report["servers"][key] = bench_server(key, cmd, port, reqs, args, model_name)

    def run_llama() -> None:
        port = free_port()
        cmd = [str(llama_bin), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
               "-c", str(slot_ctx * args.clients), "-np", str(args.clients),
               "-t", str(args.threads), "-tb", str(args.threads), "--cont-batching",
               "--no-webui", "-a", model_name] + shlex.split(args.llama_args)
        report["servers"]["llama"] = bench_server("llama", cmd, port, reqs, args, model_name)

    def run_vllm() -> None:
        port = free_port()
        cmd = vllm_peer.server_command(Path(report["vllm"]["hf_dir"]), port, model_name,
                                       args.clients, slot_ctx, shlex.split(args.vllm_args))
        env = vllm_peer.server_env(args.threads, vllm_peer.find_tcmalloc())
        report["servers"]["vllm"] = bench_server("vllm", cmd, port, reqs, args, model_name,
                                                 env=env,
                                                 startup_timeout=args.vllm_startup_timeout)

    run = {"cortex": run_cortex, "cortex-mlx": lambda: run_cortex("mlx"), "llama": run_llama,
           "vllm": run_vllm}
    failed = []
    for name in servers:
        try:
            run[name]()
        except (RuntimeError, OSError, aiohttp.ClientError, asyncio.TimeoutError) as e:
            # One server that does not start or warm up does not cost the others' figures.
            log(f"{SERVERS[name]}: {type(e).__name__}: {e}")
            report["servers"][SERVERS[name]] = {"error": f"{type(e).__name__}: {e}"}
            failed.append(name)

    c = report["servers"].get("cortexstream")
    m = report["servers"].get("cortexstream-mlx")
    if c and m and "error" not in c and "error" not in m:
        report["ratios_mlx_over_cpu_backend"] = {
            k: rnd(m[k] / c[k], 3) if c.get(k) and m.get(k) else None
            for k in ["output_tokens_per_s", "ttft_s_p50", "tpot_s_p50", "latency_s_p50"]}
    for peer in ("llama", "vllm"):
        o = report["servers"].get(peer)
        if not c or not o or "error" in c or "error" in o:
            continue

        def ratio(key: str):
            return rnd(c[key] / o[key], 3) if c.get(key) and o.get(key) else None

        report[f"ratios_cortexstream_over_{peer}"] = {
            k: ratio(k) for k in ["output_tokens_per_s", "ttft_s_p50", "ttft_s_p99", "tpot_s_p50",
                                  "tpot_s_p99", "latency_s_p50", "latency_s_p99"]}
        report["ratios_note"] = ("output_tokens_per_s: higher is better for CortexStream; "
                                 "time ratios: lower is better")
    report["host"]["loadavg_end"] = loadavg()
    print(json.dumps(report, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
