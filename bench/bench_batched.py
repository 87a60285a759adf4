#!/usr/bin/env python3
"""Batched throughput next to llama.cpp's `llama-batched-bench`: same model, same sizes, same run.

For each model format of --formats (default q4_1,q4_0,q8_0; q4_1: the default model file;
q4_0, q8_0: that file re-quantized by `llama-quantize --allow-requantize` into
bench/.cache/models/, made on first use) and each N of --npl (default 1,4,16,32,64),
runs

  cortexstream bench batched --json --model M --npl N --npp P --ntg G --threads T --repeats 1
  llama-batched-bench -m M -c N*(P+G) -b 2048 -ub 512 -npp P -ntg G -npl N -t T -tb T
                      --output-format jsonl

one after the other, --repeats times, alternating which goes first, so that load from other
processes hits both alike. Each side's best sample (highest tokens/s) is reported, with all
samples, and the ratios cortexstream / llama.cpp (> 1: cortexstream faster).

What the figures count (for CortexStream: docs/cli.md, "bench batched"):
  prefill  N x P prompt tokens / the time to compute them. CortexStream: one engine step, and
           it also samples each sequence's first token. llama.cpp: llama_decode of the N x P
           tokens in batches of 2048 (micro-batches of 512), logits of each last position.
  decode   tokens / time of the decode steps, N tokens a step. CortexStream: N x (G - 1) tokens
           in G - 1 steps (the first token comes from the prefill), greedy sampling included.
           llama.cpp: N x G tokens in G steps, no sampling (random token ids are fed back).
Neither side times the model load; each process runs a warm-up first (CortexStream: one request
of P prompt tokens and 2 generated; llama-batched-bench: a 16-token batch). llama.cpp's context
is exactly N x (P + G) cells, split evenly over N sequences (its default, non-unified KV).

When llama-batched-bench (or llama-quantize) is missing at its default path, it is built from
the llama.cpp source vendored by the pinned llama-cpp-python sdist (bench/llama_cpp_build.py).
Prints one JSON object on stdout; progress goes to stderr; llama.cpp's logs go to bench/out/.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from llama_cpp_build import (DEFAULT_MODEL, cpu_name, default_tool_path, ensure_llama_tool,
                             git_commit, llama_info, model_for_format, parse_formats)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BIN = ROOT / "build" / "src" / "cli" / "cortexstream"
DEFAULT_LLAMA_BIN = default_tool_path("llama-batched-bench")
OUT_DIR = ROOT / "bench" / "out"


def log(msg: str) -> None:
    print(f"[bench_batched {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def rel(path: Path) -> str:
    """`path` relative to the repository when it is inside it (links not followed)."""
    path = Path(os.path.abspath(path))
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def int_list(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}")
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"need integers >= 1: {text!r}")
    return out


def run_cortexstream(args: argparse.Namespace, model: Path, n: int) -> dict:
    cmd = [str(args.bin), "bench", "batched", "--json", "--model", str(model), "--npl", str(n),
           "--npp", str(args.npp), "--ntg", str(args.ntg), "--threads", str(args.threads),
           "--repeats", "1"]
    log(" ".join(cmd))
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"cortexstream exited with {p.returncode}: {p.stderr.strip()}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    r = out["results"][0]
    return {"prefill_tokens_per_s": r["prefill_tokens_per_s"],
            "decode_tokens_per_s": r["decode_tokens_per_s"],
            "total_tokens_per_s": r["total_tokens_per_s"],
            "prefill_s": r["prefill_s"], "decode_s": r["decode_s"],
            "all_sequences_together": r["all_sequences_together"],
            "engine_config": r["engine_config"], "threads": out["threads"]}


def run_llama(args: argparse.Namespace, llama_bin: Path, model: Path, fmt: str, n: int,
              sample: int) -> dict:
    ctx = n * (args.npp + args.ntg)
    cmd = [str(llama_bin), "-m", str(model), "-c", str(ctx), "-b", "2048", "-ub", "512",
           "-npp", str(args.npp), "-ntg", str(args.ntg), "-npl", str(n), "-t", str(args.threads),
           "-tb", str(args.threads), "--output-format", "jsonl"]
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    log_path = OUT_DIR / f"batched-llama-{fmt.lower()}-n{n}-{sample}.log"
    log(f"{' '.join(cmd)}  (log: {rel(log_path)})")
    p = subprocess.run(cmd, capture_output=True, text=True)
    log_path.write_text(p.stdout + p.stderr)
    if p.returncode != 0:
        raise RuntimeError(f"llama-batched-bench exited with {p.returncode} (see {rel(log_path)})")
    rows = []
    for line in (p.stdout + "\n" + p.stderr).splitlines():
        line = line.strip()
        if line.startswith("{") and '"speed_pp"' in line:
            rows.append(json.loads(line))
    rows = [r for r in rows if r.get("pl") == n]
    if len(rows) != 1:
        raise RuntimeError(f"expected one jsonl result for npl {n} in {rel(log_path)} "
                           f"(is -c {ctx} too small?)")
    r = rows[0]
    return {"prefill_tokens_per_s": r["speed_pp"], "decode_tokens_per_s": r["speed_tg"],
            "total_tokens_per_s": r["speed"], "prefill_s": r["t_pp"], "decode_s": r["t_tg"],
            "settings": {k: r[k] for k in ("n_kv_max", "n_batch", "n_ubatch", "flash_attn",
                                           "is_pp_shared", "n_threads", "n_threads_batch")
                         if k in r},
            "log": rel(log_path)}


def best(samples: list[dict]) -> dict:
    """The best sample of each figure (highest tokens/s), with every sample."""
    keys = ("prefill_tokens_per_s", "decode_tokens_per_s", "total_tokens_per_s")
    out = {k: round(max(s[k] for s in samples), 2) for k in keys}
    out["samples"] = [{k: round(s[k], 2) for k in keys} for s in samples]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                    help="GGUF model; the other formats are made from it")
    ap.add_argument("--bin", type=Path, default=DEFAULT_BIN, help="cortexstream binary")
    ap.add_argument("--llama-batched-bench-bin", type=Path, default=DEFAULT_LLAMA_BIN,
                    help="llama-batched-bench binary (built into bench/.cache when missing at "
                         "the default path)")
    ap.add_argument("--formats", default="q4_1,q4_0,q8_0",
                    help="comma-separated model formats (default q4_1,q4_0,q8_0): the --model "
                         "file for the format its name states, the others made from it by "
                         "llama-quantize --allow-requantize")
    ap.add_argument("--npl", type=int_list, default=[1, 4, 16, 32, 64],
                    help="parallel sequence counts (default 1,4,16,32,64)")
    ap.add_argument("--npp", type=int, default=128, help="prompt tokens per sequence")
    ap.add_argument("--ntg", type=int, default=128, help="generated tokens per sequence")
    ap.add_argument("--threads", type=int, default=2, help="compute threads of each side")
    ap.add_argument("--repeats", type=int, default=1,
                    help="samples of each side per format and N (best reported)")
    ap.add_argument("--skip-llama", action="store_true", help="measure CortexStream only")
    args = ap.parse_args()
    if args.npp < 1 or args.ntg < 2 or args.threads < 1 or args.repeats < 1:
        ap.error("--npp, --threads and --repeats must be >= 1, --ntg >= 2")
    for path, hint in [(args.model, "scripts/fetch_model.sh fetches the default model"),
                       (args.bin, "scripts/build.sh release cortexstream, or --bin")]:
        if not path.exists():
            ap.error(f"{path}: not found ({hint})")
    try:
        formats = parse_formats(args.formats)
    except RuntimeError as e:
        ap.error(str(e))

    report: dict = {
        "bench": "batched",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": {"cpu": cpu_name(), "cores": os.cpu_count(),
                 "loadavg_start": [round(x, 2) for x in os.getloadavg()]},
        "cortexstream_commit": git_commit(),
        "threads": args.threads, "npp": args.npp, "ntg": args.ntg, "npl": args.npl,
        "repeats": args.repeats,
        "protocol": "per format and N, --repeats samples of each side, alternating which runs "
                    "first; each sample a fresh process; model load not timed; best sample per "
                    "figure. prefill = N*npp / prefill time; decode tokens/s: cortexstream "
                    "N*(ntg-1) over ntg-1 steps (first token from the prefill), llama.cpp N*ntg "
                    "over ntg steps; ratios = cortexstream / llama.cpp",
    }
    llama_bin = args.llama_batched_bench_bin
    try:
        if not args.skip_llama:
            if not llama_bin.exists():
                if llama_bin.resolve() != DEFAULT_LLAMA_BIN.resolve():
                    ap.error(f"{llama_bin}: not found")
                _, report["llama_build"] = ensure_llama_tool("llama-batched-bench")
            report["llama_cpp"] = {**llama_info(llama_bin),
                                   "command": "llama-batched-bench -m M -c N*(npp+ntg) -b 2048 "
                                              "-ub 512 -npp P -ntg G -npl N -t T -tb T "
                                              "--output-format jsonl"}
        else:
            report["llama_cpp"] = {"skipped": True, "reason": "--skip-llama given"}

        report["formats"] = {}
        for fmt in formats:
            model = model_for_format(args.model, fmt)
            entry: dict = {"model": rel(model), "model_bytes": model.stat().st_size,
                           "results": []}
            report["formats"][fmt.lower()] = entry
            for n in args.npl:
                cs: list[dict] = []
                ll: list[dict] = []
                for r in range(args.repeats):
                    order = ["cs", "llama"] if r % 2 == 0 else ["llama", "cs"]
                    for side in order:
                        if side == "cs":
                            cs.append(run_cortexstream(args, model, n))
                        elif not args.skip_llama:
                            ll.append(run_llama(args, llama_bin, model, fmt, n, r))
                row: dict = {"n": n, "cortexstream": best(cs)}
                row["cortexstream"]["all_sequences_together"] = all(
                    s["all_sequences_together"] for s in cs)
                row["cortexstream"]["engine_config"] = cs[0]["engine_config"]
                if ll:
                    row["llama_cpp"] = best(ll)
                    row["llama_cpp"]["settings"] = ll[0]["settings"]
                    row["ratios"] = {
                        k: round(row["cortexstream"][f"{k}_tokens_per_s"]
                                 / row["llama_cpp"][f"{k}_tokens_per_s"], 3)
                        for k in ("prefill", "decode", "total")}
                entry["results"].append(row)
                log(f"{fmt} N={n}: cortexstream pp {row['cortexstream']['prefill_tokens_per_s']}"
                    f" tg {row['cortexstream']['decode_tokens_per_s']}"
                    + (f"; llama.cpp pp {row['llama_cpp']['prefill_tokens_per_s']} tg "
                       f"{row['llama_cpp']['decode_tokens_per_s']}" if ll else ""))
    except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
        log(f"error: {e}")
        return 1
    report["host"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
