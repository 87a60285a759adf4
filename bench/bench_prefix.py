#!/usr/bin/env python3
"""Prefix sharing: `cortexstream serve` next to llama.cpp's `llama-server` and vLLM, same run.

Servers (--servers, in the order they run; default cortex,cortex-nocache,llama): `cortex` is
`cortexstream serve` (automatic prefix caching on, its default), `cortex-nocache` the same with
`--no-prefix-caching` (the cache's own effect), `llama` is llama.cpp's `llama-server` on the same
GGUF file (it keeps each slot's last prompt and reuses the common prefix; every request sends
`cache_prompt: true`), `vllm` is vLLM's CPU server on a dense bfloat16 copy of that file (its
default automatic prefix caching; bench/vllm_peer.py makes its virtualenv on first use).
Server start, health check, warm-up and stop are bench_serve.py's; one server runs at a time.

Three scenarios, each run against every server (--scenarios; `cortex-nocache` runs
--nocache-scenarios, default a,c):

  a  shared-prefix TTFT. A cold request whose prompt is a ~--prefix-tokens (2,000) token document
     (prose sentences drawn with a per-repeat seed, opened by a unique tag so that not even its
     first KV block was seen before) plus a short question, then a warm request with the same
     document and another question. Both streamed from /v1/completions, temperature 0, ignore_eos,
     max_tokens --a-max-tokens (4). --repeats (3) times with a fresh document each time.
     Reported: cold and warm TTFT (median and every sample), speedup = cold / warm.
  b  shared system prompt under load. --clients (32) concurrent clients in a closed loop send
     --requests (128) streamed /v1/completions requests, each the same ~--system-tokens (1,000)
     token system prompt plus a distinct short question, max_tokens --b-max-tokens (48),
     temperature 0, ignore_eos. Nothing is cached before the load starts. Reported: output
     tokens/s (completion tokens / wall time), TTFT p50/p99, TPOT and latency p50.
  c  chat replay. One conversation of --turns (10) turns through /v1/chat/completions: each turn
     appends the server's previous answer and a new user message (~--user-tokens (120) tokens of
     prose plus a question) to the messages, temperature 0, max_tokens --c-max-tokens (48),
     streamed. Reported: TTFT and prompt tokens per turn, and last-turn TTFT / first-turn TTFT.
  d  (not in the default list) what a warm request costs per token it computes: a cold request of
     --prefix-tokens + 1 random token ids (whole blocks of 16 for the default 2,000), then warm
     requests of the same first --prefix-tokens ids plus k fresh ones, k in 1, 2, 4, 8, 16, 32
     (3 each, median), max_tokens 1. Token-id prompts, so that exactly k tokens are new.

Every request records the prompt tokens each server counted and the cached prompt tokens it
reports: `usage.prompt_tokens_details.cached_tokens` (CortexStream, vLLM with
--enable-prompt-tokens-details, which this script passes) or llama-server's `timings.cache_n`.

Then the ratios: CortexStream over each peer (warm TTFT in a, tokens/s and TTFT in b, last-turn
TTFT in c) and the targets of the benchmark, each with `met` true/false.

Prints one JSON object on stdout; progress goes to stderr; server logs go to
bench/out/prefix-<server>.log.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import shlex
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from bench_serve import (DEFAULT_BIN, DEFAULT_LLAMA_BIN, DEFAULT_MODEL, OUT_DIR, ROOT, SENTENCES,
                         TOKENS_PER_WORD, free_port, loadavg, one_request, percentile, rnd,
                         stop_server, wait_health, warm_up)
from llama_cpp_build import build_llama_tool, cpu_name, git_commit, llama_info
import vllm_peer

try:
    import aiohttp
except ImportError:  # pragma: no cover - told to the user below
    aiohttp = None

# flag name -> JSON key
SERVERS = {"cortex": "cortexstream", "cortex-nocache": "cortexstream-nocache", "llama": "llama",
           "vllm": "vllm"}
SCENARIOS = {"a": "shared_prefix_ttft", "b": "system_prompt_load", "c": "chat_replay",
             "d": "computed_tokens_sweep"}

QUESTIONS = [
    "Who kept the marks on the wall, and what did they record?",
    "What was sold at the market on Thursdays?",
    "Why did the road have to climb gently?",
    "What did the first issue of the newspaper contain?",
    "How did the engineer convince the town council?",
    "What did the children argue about for weeks?",
    "Who came to the town after the road was finished?",
    "Where was the railway station built?",
    "What happened when the first train arrived?",
    "Why were some of the older farmers unhappy?",
    "How long did the road take to build?",
    "What made the blacksmith's forge popular in winter?",
]
TAG_WORDS = ["amber", "basalt", "cedar", "delta", "ember", "fjord", "garnet", "harbor", "indigo",
             "juniper", "kestrel", "lantern", "meadow", "nectar", "onyx", "prairie", "quartz",
             "raven", "saffron", "tundra", "umber", "violet", "willow", "yarrow", "zephyr"]


def log(msg: str) -> None:
    print(f"[bench_prefix {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- prompts

def document(rng: random.Random, tokens: int) -> str:
    """About `tokens` tokens of prose, opened by a tag of random words and a number, so that two
    documents differ from their first token on (no KV block of one can serve the other)."""
    tag = " ".join(rng.choice(TAG_WORDS) for _ in range(4))
    words = f"Record {rng.randrange(10**6, 10**7)} ({tag}).".split()
    wanted = max(len(words) + 1, int(round(tokens / TOKENS_PER_WORD)))
    while len(words) < wanted:
        words.extend(rng.choice(SENTENCES).split())
    return " ".join(words[:wanted])


def question_text(i: int, rng: random.Random) -> str:
    return f"\n\nQuestion {i}: {rng.choice(QUESTIONS)}\nAnswer:"


def cached_of(r: dict):
    """The cached prompt tokens a server reported: usage's cached_tokens, else llama's cache_n."""
    return r["cached_tokens"] if r["cached_tokens"] is not None else r["llama_cache_n"]


class Client:
    """Request bodies for one server: the same fields everywhere, plus `cache_prompt` for
    llama-server (its default in recent versions, sent explicitly)."""

    def __init__(self, base: str, model_name: str, llama: bool, timeout_s: float):
        self.base, self.model_name, self.llama, self.timeout_s = base, model_name, llama, timeout_s

    def body(self, max_tokens: int, prompt: str | None = None, messages: list | None = None,
             ignore_eos: bool = False) -> dict:
        b = {"model": self.model_name, "max_tokens": max_tokens, "temperature": 0,
             "stream": True, "stream_options": {"include_usage": True}}
        if prompt is not None:
            b["prompt"] = prompt
        else:
            b["messages"] = messages
        if ignore_eos:
            b["ignore_eos"] = True
        if self.llama:
            b["cache_prompt"] = True
        return b

    async def one(self, path: str, body: dict) -> dict:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            return await one_request(s, self.base + path, body, self.timeout_s,
                                     need_usage=False)


def brief(r: dict) -> dict:
    return {k: (rnd(v, 5) if isinstance(v, float) else v) for k, v in r.items()
            if k in ("ttft_s", "latency_s", "prompt_tokens", "completion_tokens",
                     "cached_tokens", "llama_cache_n", "error")}


def check(r: dict, what: str) -> dict:
    if not r["ok"]:
        raise RuntimeError(f"{what} failed: {r['error']}")
    return r


# ----------------------------------------------------------------------------- scenario a

async def scenario_a(cl: Client, args: argparse.Namespace) -> dict:
    samples = []
    for rep in range(args.repeats):
        rng = random.Random(f"a-{args.seed}-{rep}")
        doc = document(rng, args.prefix_tokens)
        cold = check(await cl.one("/v1/completions", cl.body(
            args.a_max_tokens, prompt=doc + question_text(1, rng), ignore_eos=True)),
            f"a: cold request {rep}")
        warm = check(await cl.one("/v1/completions", cl.body(
            args.a_max_tokens, prompt=doc + question_text(2, rng), ignore_eos=True)),
            f"a: warm request {rep}")
        s = {"cold": brief(cold), "warm": brief(warm),
             "speedup": rnd(cold["ttft_s"] / warm["ttft_s"], 2)}
        log(f"  a[{rep}]: cold TTFT {cold['ttft_s'] * 1e3:.1f} ms ({cold['prompt_tokens']} "
            f"prompt tokens, cached {cached_of(cold)}), warm {warm['ttft_s'] * 1e3:.1f} ms "
            f"(cached {cached_of(warm)}), speedup {s['speedup']}")
        samples.append(s)
    cold_t = [s["cold"]["ttft_s"] for s in samples]
    warm_t = [s["warm"]["ttft_s"] for s in samples]
    return {"cold_ttft_s_median": rnd(percentile(cold_t, 50)),
            "warm_ttft_s_median": rnd(percentile(warm_t, 50), 5),
            "speedup_median": rnd(percentile([s["speedup"] for s in samples], 50), 2),
            "speedup_of_medians": rnd(percentile(cold_t, 50) / percentile(warm_t, 50), 2),
            "samples": samples}


# ----------------------------------------------------------------------------- scenario b

async def scenario_b(cl: Client, args: argparse.Namespace) -> dict:
    rng = random.Random(f"b-{args.seed}")
    system = document(rng, args.system_tokens)
    prompts = [system + question_text(i, rng) for i in range(args.requests)]
    queue: asyncio.Queue = asyncio.Queue()
    for i, p in enumerate(prompts):
        queue.put_nowait((i, p))
    results: list = [None] * len(prompts)
    # One connection per request, as bench_serve.py (llama-server closes a streamed connection).
    conn = aiohttp.TCPConnector(limit=args.clients, force_close=True)
    async with aiohttp.ClientSession(connector=conn) as session:
        async def worker() -> None:
            while True:
                try:
                    i, p = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                r = await one_request(session, cl.base + "/v1/completions",
                                      cl.body(args.b_max_tokens, prompt=p, ignore_eos=True),
                                      cl.timeout_s, need_usage=False)
                results[i] = r
                if not r["ok"]:
                    log(f"  b: request {i} failed: {r['error']}")

        load_before = loadavg()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.clients)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if r and r["ok"]]
    ttft = [r["ttft_s"] for r in ok]
    tpot = [(r["latency_s"] - r["ttft_s"]) / (r["completion_tokens"] - 1)
            for r in ok if (r["completion_tokens"] or 0) >= 2]
    out_tok = sum(r["completion_tokens"] or 0 for r in ok)
    cached = [cached_of(r) for r in ok if cached_of(r) is not None]
    prompt_tok = [r["prompt_tokens"] for r in ok if r["prompt_tokens"] is not None]
    errors = sorted({r["error"] for r in results if r and not r["ok"]})
    return {"completed": len(ok), "failed": len(results) - len(ok), "wall_s": rnd(wall, 3),
            "output_tokens_total": out_tok,
            "output_tokens_per_s": rnd(out_tok / wall if wall > 0 else None, 2),
            "ttft_s_p50": rnd(percentile(ttft, 50)), "ttft_s_p99": rnd(percentile(ttft, 99)),
            "tpot_s_p50": rnd(percentile(tpot, 50), 5),
            "latency_s_p50": rnd(percentile([r["latency_s"] for r in ok], 50)),
            "prompt_tokens_p50": percentile(prompt_tok, 50),
            "prompt_tokens_total": sum(prompt_tok),
            "cached_tokens_total": sum(cached) if cached else None,
            "cached_fraction": (rnd(sum(cached) / sum(prompt_tok), 3)
                                if cached and sum(prompt_tok) else None),
            "loadavg_before": load_before, "loadavg_after": loadavg(),
            "errors": errors[:5]}


# ----------------------------------------------------------------------------- scenario c

async def scenario_c(cl: Client, args: argparse.Namespace) -> dict:
    rng = random.Random(f"c-{args.seed}")
    messages = [{"role": "system",
                 "content": "You are a helpful assistant. " + document(rng, 40)}]
    turns = []
    for t in range(args.turns):
        messages.append({"role": "user", "content": document(rng, args.user_tokens)
                         + question_text(t + 1, rng).replace("\nAnswer:", "")})
        r = check(await cl.one("/v1/chat/completions",
                               cl.body(args.c_max_tokens, messages=list(messages))),
                  f"c: turn {t + 1}")
        messages.append({"role": "assistant", "content": r["text"]})
        turns.append(brief(r))
    ttft = [t["ttft_s"] for t in turns]
    cached = [cached_of(t) for t in turns]
    log(f"  c: TTFT per turn (ms): {', '.join(f'{x * 1e3:.0f}' for x in ttft)}; prompt tokens "
        f"{turns[0]['prompt_tokens']} -> {turns[-1]['prompt_tokens']}; cached {cached}")
    return {"ttft_s": ttft,
            "prompt_tokens": [t["prompt_tokens"] for t in turns],
            "cached_tokens": cached,
            "completion_tokens": [t["completion_tokens"] for t in turns],
            "last_over_first_ttft": rnd(ttft[-1] / ttft[0], 3),
            "median_ttft_s_turns_2_on": rnd(percentile(ttft[1:], 50)) if len(ttft) > 1 else None}


# ----------------------------------------------------------------------------- scenario d

async def scenario_d(cl: Client, args: argparse.Namespace) -> dict:
    rng = random.Random(f"d-{args.seed}")
    prefix = [rng.randrange(300, 40000) for _ in range(args.prefix_tokens)]
    cold = check(await cl.one("/v1/completions", cl.body(
        1, prompt=prefix + [rng.randrange(300, 40000)], ignore_eos=True)), "d: cold request")
    warm = {}
    for k in (1, 2, 4, 8, 16, 32):
        t = []
        for _ in range(3):
            r = check(await cl.one("/v1/completions", cl.body(
                1, prompt=prefix + [rng.randrange(300, 40000) for _ in range(k)],
                ignore_eos=True)), f"d: warm request, {k} new tokens")
            t.append(r["ttft_s"])
        warm[k] = {"ttft_s_median": rnd(percentile(t, 50), 5),
                   "speedup": rnd(cold["ttft_s"] / percentile(t, 50), 1),
                   "cached_tokens": cached_of(r)}
        log(f"  d: {k} new tokens: TTFT {percentile(t, 50) * 1e3:.1f} ms, "
            f"speedup {warm[k]['speedup']}, cached {cached_of(r)}")
    return {"cold": brief(cold), "warm_by_new_tokens": warm}


# ----------------------------------------------------------------------------- servers

@contextmanager
def running_server(name: str, cmd: list[str], port: int, model_name: str, startup_timeout: float,
                   env: dict | None = None):
    """Starts a server (bench_serve.py's way: own session, log in bench/out/, /health, two
    warm-up requests), yields its base URL and facts, then stops it with SIGTERM."""
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    log_path = OUT_DIR / f"prefix-{name}.log"
    env_text = " ".join(f"{k}={v}" for k, v in (env or {}).items())
    log(f"{name}: {env_text + ' ' if env_text else ''}{' '.join(cmd)}  "
        f"(log: {log_path.relative_to(ROOT)})")
    base = f"http://127.0.0.1:{port}"
    facts = {"command": cmd, "env": env or {}, "log": str(log_path.relative_to(ROOT))}
    with open(log_path, "wb") as logf:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                env=dict(os.environ, **env) if env else None)
        try:
            wait_health(base, proc, startup_timeout)
            facts["startup_s"] = round(time.perf_counter() - t0, 2)
            asyncio.run(warm_up(base, model_name))
            log(f"{name}: healthy after {facts['startup_s']} s, warmed up")
            yield base, facts
        finally:
            facts["exit_status"] = stop_server(proc)


def run_server(name: str, cmd: list[str], scenarios: list[str], args: argparse.Namespace,
               model_name: str, startup_timeout: float, env: dict | None = None) -> dict:
    port = int(cmd[cmd.index("--port") + 1])
    out: dict = {}
    with running_server(name, cmd, port, model_name, startup_timeout, env) as (base, facts):
        cl = Client(base, model_name, name == "llama", args.request_timeout)
        # One unmeasured long request, so that nothing a first long prompt costs (buffers,
        # compiled shapes) lands in the cold sample of scenario a.
        rng = random.Random(f"warm-{args.seed}")
        check(asyncio.run(cl.one("/v1/completions", cl.body(
            4, prompt=document(rng, args.prefix_tokens) + question_text(0, rng),
            ignore_eos=True))),
            "long warm-up request")
        for sc in scenarios:
            log(f"{name}: scenario {sc} ({SCENARIOS[sc]})")
            t0 = time.perf_counter()
            fn = {"a": scenario_a, "b": scenario_b, "c": scenario_c, "d": scenario_d}[sc]
            try:
                out[SCENARIOS[sc]] = asyncio.run(fn(cl, args))
            except (RuntimeError, aiohttp.ClientError, asyncio.TimeoutError) as e:
                log(f"{name}: scenario {sc}: {type(e).__name__}: {e}")
                out[SCENARIOS[sc]] = {"error": f"{type(e).__name__}: {e}"}
            log(f"{name}: scenario {sc} took {time.perf_counter() - t0:.1f} s")
            if sc == "b" and "error" not in out[SCENARIOS[sc]]:
                b = out[SCENARIOS[sc]]
                log(f"  b: {b['completed']} ok, {b['failed']} failed, {b['output_tokens_per_s']} "
                    f"output tok/s, TTFT p50 {b['ttft_s_p50']} s p99 {b['ttft_s_p99']} s, "
                    f"cached fraction {b['cached_fraction']}")
        if name.startswith("cortex"):
            out["prefix_cache_metrics"] = asyncio.run(prefix_metrics(base))
    out.update(facts)
    return out


async def prefix_metrics(base: str) -> dict:
    """CortexStream's prefix-cache counters and gauges from /metrics, after the scenarios."""
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(base + "/metrics", timeout=aiohttp.ClientTimeout(total=10)) as r:
                text = await r.text()
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, _, value = line.rpartition(" ")
        if "prefix_cache" in key or "blocks_cached" in key:
            try:
                out[key] = float(value)
            except ValueError:
                pass
    return out


# ----------------------------------------------------------------------------- comparisons

def ratios_and_targets(report: dict) -> None:
    sv = report["servers"]

    def get(server: str, scenario: str, key: str):
        v = (sv.get(server) or {}).get(scenario) or {}
        return v.get(key) if isinstance(v, dict) else None

    def ratio(x, y, nd=3):
        return rnd(x / y, nd) if x and y else None

    ratios: dict = {}
    targets: dict = {}
    for peer in ("llama", "vllm", "cortexstream-nocache"):
        if peer not in sv or "cortexstream" not in sv:
            continue
        r = {
            "a_warm_ttft": ratio(get("cortexstream", "shared_prefix_ttft", "warm_ttft_s_median"),
                                 get(peer, "shared_prefix_ttft", "warm_ttft_s_median")),
            "a_cold_ttft": ratio(get("cortexstream", "shared_prefix_ttft", "cold_ttft_s_median"),
                                 get(peer, "shared_prefix_ttft", "cold_ttft_s_median")),
            "b_output_tokens_per_s": ratio(
                get("cortexstream", "system_prompt_load", "output_tokens_per_s"),
                get(peer, "system_prompt_load", "output_tokens_per_s")),
            "b_ttft_p50": ratio(get("cortexstream", "system_prompt_load", "ttft_s_p50"),
                                get(peer, "system_prompt_load", "ttft_s_p50")),
            "b_ttft_p99": ratio(get("cortexstream", "system_prompt_load", "ttft_s_p99"),
                                get(peer, "system_prompt_load", "ttft_s_p99")),
        }
        c_ttft = get("cortexstream", "chat_replay", "ttft_s")
        p_ttft = get(peer, "chat_replay", "ttft_s")
        r["c_last_turn_ttft"] = ratio(c_ttft[-1], p_ttft[-1]) if c_ttft and p_ttft else None
        ratios[f"cortexstream_over_{peer}"] = {k: v for k, v in r.items() if v is not None}

    def target(key: str, value, goal: str, met) -> None:
        targets[key] = {"value": value, "target": goal,
                        "met": None if value is None or met is None else bool(met)}

    sp = get("cortexstream", "shared_prefix_ttft", "speedup_median")
    target("a_cortex_speedup", sp, ">= 100", sp is not None and sp >= 100)
    lr = (ratios.get("cortexstream_over_llama") or {}).get("a_warm_ttft")
    target("a_cortex_warm_ttft_over_llama", lr, "< 1", lr is not None and lr < 1)
    for peer, goal in (("llama", 1.5), ("vllm", 1.0)):
        rr = ratios.get(f"cortexstream_over_{peer}") or {}
        v = rr.get("b_output_tokens_per_s")
        target(f"b_output_tokens_per_s_over_{peer}", v, f">= {goal}",
               v is not None and v >= goal)
        v = rr.get("b_ttft_p50")
        target(f"b_ttft_p50_over_{peer}", v, "< 1", v is not None and v < 1)
    report["ratios"] = ratios
    report["ratios_note"] = ("tokens/s: higher is better for CortexStream; time ratios: lower is "
                             "better")
    report["targets"] = {k: v for k, v in targets.items() if v["value"] is not None}


# ----------------------------------------------------------------------------- main

def parse_list(text: str, known, what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in known]
    if bad or len(set(names)) != len(names):
        raise SystemExit(f"{what} {text!r}: a list of distinct names among {', '.join(known)}")
    return names


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help=f"GGUF model (default {DEFAULT_MODEL})")
    ap.add_argument("--servers", default="cortex,cortex-nocache,llama",
                    help="servers to run, in this order, among cortex, cortex-nocache, llama, "
                         "vllm (default cortex,cortex-nocache,llama)")
    ap.add_argument("--scenarios", default="a,b,c", help="scenarios to run (default a,b,c)")
    ap.add_argument("--nocache-scenarios", default="a,c",
                    help="scenarios of cortex-nocache (default a,c), within --scenarios")
    ap.add_argument("--bin", default=str(DEFAULT_BIN), help="cortexstream binary")
    ap.add_argument("--llama-server-bin", default=str(DEFAULT_LLAMA_BIN),
                    help="llama-server binary (built into bench/.cache when missing at the "
                         "default path)")
    ap.add_argument("--threads", type=int, default=2, help="compute threads of each server")
    ap.add_argument("--seed", type=int, default=0, help="seed of every prompt")
    ap.add_argument("--slot-ctx", type=int, default=4096,
                    help="context per llama-server slot (its -c is clients x this) and vLLM's "
                         "--max-model-len (default 4096)")
    # a
    ap.add_argument("--repeats", type=int, default=3, help="a: cold/warm pairs (default 3)")
    ap.add_argument("--prefix-tokens", type=int, default=2000,
                    help="a: shared document, tokens (default 2000)")
    ap.add_argument("--a-max-tokens", type=int, default=4, help="a: max_tokens (default 4)")
    # b
    ap.add_argument("--clients", type=int, default=32, help="b: concurrent clients (default 32)")
    ap.add_argument("--requests", type=int, default=128, help="b: requests in all (default 128)")
    ap.add_argument("--system-tokens", type=int, default=1000,
                    help="b: shared system prompt, tokens (default 1000)")
    ap.add_argument("--b-max-tokens", type=int, default=48, help="b: max_tokens (default 48)")
    # c
    ap.add_argument("--turns", type=int, default=10, help="c: chat turns (default 10)")
    ap.add_argument("--user-tokens", type=int, default=120,
                    help="c: prose in each user message, tokens (default 120)")
    ap.add_argument("--c-max-tokens", type=int, default=48, help="c: max_tokens (default 48)")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: 1 repeat, 500-token prefix, 8 clients, 16 requests, 300-"
                         "token system prompt, 3 turns")
    ap.add_argument("--llama-args", default="", help="extra llama-server arguments")
    ap.add_argument("--vllm-args", default="", help="extra arguments of vLLM's server")
    ap.add_argument("--cortex-args", default="", help="extra cortexstream serve arguments")
    ap.add_argument("--request-timeout", type=float, default=600)
    ap.add_argument("--startup-timeout", type=float, default=180)
    ap.add_argument("--vllm-startup-timeout", type=float, default=900)
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.prefix_tokens = 1, 500
        args.clients, args.requests, args.system_tokens = 8, 16, 300
        args.turns = 3

    if aiohttp is None:
        print("bench_prefix.py needs aiohttp: python3 -m pip install -r bench/requirements.txt",
              file=sys.stderr)
        return 2
    servers = parse_list(args.servers, SERVERS, "--servers")
    scenarios = parse_list(args.scenarios, SCENARIOS, "--scenarios")
    nocache_scenarios = [s for s in parse_list(args.nocache_scenarios, SCENARIOS,
                                               "--nocache-scenarios") if s in scenarios]
    model = Path(args.model) if args.model else DEFAULT_MODEL
    if not model.exists():
        print(f"{model}: not found (scripts/fetch_model.sh fetches the default model)",
              file=sys.stderr)
        return 2
    model_name = model.name
    cs_bin = Path(args.bin)
    if any(s.startswith("cortex") for s in servers) and not cs_bin.exists():
        print(f"{cs_bin}: not found (scripts/build.sh release cortexstream, or --bin)",
              file=sys.stderr)
        return 2

    report: dict = {
        "bench": "prefix",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": {"cpu": cpu_name(), "cores": os.cpu_count(), "loadavg_start": loadavg()},
        "cortexstream_commit": git_commit(),
        "model": str(model.relative_to(ROOT) if model.is_relative_to(ROOT) else model),
        "servers_run": [SERVERS[n] for n in servers],
        "settings": {k: getattr(args, k) for k in (
            "threads", "seed", "slot_ctx", "repeats", "prefix_tokens", "a_max_tokens",
            "clients", "requests", "system_tokens", "b_max_tokens", "turns", "user_tokens",
            "c_max_tokens", "quick")},
        "scenarios": {SCENARIOS[s]: s for s in scenarios},
        "servers": {},
    }
    report["settings"]["nocache_scenarios"] = nocache_scenarios

    llama_bin = Path(args.llama_server_bin)
    if "llama" in servers:
        if not llama_bin.exists():
            if llama_bin.resolve() != DEFAULT_LLAMA_BIN.resolve():
                print(f"{llama_bin}: not found", file=sys.stderr)
                return 2
            try:
                report["llama_build"] = build_llama_tool("llama-server")
            except (subprocess.CalledProcessError, RuntimeError, OSError) as e:
                print(f"building llama-server failed: {e}", file=sys.stderr)
                return 3
        report["llama_cpp"] = llama_info(llama_bin)
    if "vllm" in servers:
        try:
            report["vllm"] = vllm_peer.ensure_vllm(model)
        except (subprocess.CalledProcessError, RuntimeError, OSError) as e:
            log(f"preparing vLLM failed: {e}; going on without it")
            report["vllm"] = {"error": str(e)}
            servers = [s for s in servers if s != "vllm"]

    failed = []
    for name in servers:
        port = free_port()
        env = None
        timeout = args.startup_timeout
        scs = scenarios
        if name in ("cortex", "cortex-nocache"):
            cmd = [str(cs_bin), "serve", "--model", str(model), "--host", "127.0.0.1",
                   "--port", str(port), "--max-num-seqs", str(args.clients),
                   "--threads", str(args.threads)] + shlex.split(args.cortex_args)
            if name == "cortex-nocache":
                cmd.append("--no-prefix-caching")
                scs = nocache_scenarios
        elif name == "llama":
            cmd = [str(llama_bin), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
                   "-c", str(args.slot_ctx * args.clients), "-np", str(args.clients),
                   "-t", str(args.threads), "-tb", str(args.threads), "--cont-batching",
                   "--no-webui", "-a", model_name] + shlex.split(args.llama_args)
        else:
            cmd = vllm_peer.server_command(
                Path(report["vllm"]["hf_dir"]), port, model_name, args.clients, args.slot_ctx,
                ["--enable-prompt-tokens-details"] + shlex.split(args.vllm_args))
            env = vllm_peer.server_env(args.threads, vllm_peer.find_tcmalloc())
            timeout = args.vllm_startup_timeout
        if not scs:
            continue
        try:
            report["servers"][SERVERS[name]] = run_server(name, cmd, scs, args, model_name,
                                                          timeout, env)
        except (RuntimeError, OSError, aiohttp.ClientError, asyncio.TimeoutError) as e:
            log(f"{name}: {type(e).__name__}: {e}")
            report["servers"][SERVERS[name]] = {"error": f"{type(e).__name__}: {e}",
                                                "command": cmd}
            failed.append(name)

    ratios_and_targets(report)
    report["host"]["loadavg_end"] = loadavg()
    print(json.dumps(report, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
