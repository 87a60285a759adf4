#!/usr/bin/env python3
"""Perplexity with attention sinks + a sliding window (windowed requests) against full attention
and against plain truncation, on a text many times longer than the window.

Each row is one `cortexstream perplexity --file F --ctx C [--kv-window W --kv-sinks S]` run: the
text is cut into windows of C tokens, each scored as one request (every token but the window's
first). The rows:

  full            --ctx C                         every token sees all of its window's tokens
                                                  (only where C fits the model's context)
  sinks+window    --ctx C --kv-window W --kv-sinks S
                                                  every token sees the S first tokens and the W
                                                  before it, in a cache of about S + W tokens
  window          --ctx C --kv-window S+W         the same cache with no sinks: the last S + W
  restart         --ctx S+W                       the text cut into independent pieces of S + W
                                                  tokens (a cache that is emptied when full)

for C = --ctx (default 4096, within SmolLM2's 8,192) and, with --long-ctx (default 16384, twice
the model's context: the window moves back while scoring), the windowed rows again. Prints one
JSON object: each row's perplexity, tokens scored, seconds, and its ratio to full attention.

  python3 bench/bench_kv_window.py [--model M] [--file F] [--ctx 4096] [--long-ctx 16384]
                                   [--window 252] [--sinks 4] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_BIN = REPO / "build" / "src" / "cli" / "cortexstream"
DEFAULT_MODEL = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_TEXT = REPO / "bench" / "data" / "perplexity.txt"


def perplexity(args: argparse.Namespace, *flags: str) -> dict:
    cmd = [args.bin, "perplexity", "--model", args.model, "--file", args.file,
           "--threads", str(args.threads), *flags]
    print("running " + " ".join(cmd[1:]), file=sys.stderr)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", default=str(DEFAULT_BIN))
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--file", default=str(DEFAULT_TEXT))
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--long-ctx", type=int, default=16384, help="0: skip")
    ap.add_argument("--window", type=int, default=252)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    cache = args.window + args.sinks
    rows = []

    def row(name: str, ctx: int, *flags: str) -> dict:
        r = perplexity(args, "--ctx", str(ctx), *flags)
        rows.append({"row": name, "ctx": ctx, "perplexity": r["perplexity"], "tokens": r["tokens"],
                     "windows": r["windows"], "seconds": r["seconds"]})
        return rows[-1]

    full = row("full", args.ctx)
    row("sinks+window", args.ctx, "--kv-window", str(args.window), "--kv-sinks", str(args.sinks))
    row("window", args.ctx, "--kv-window", str(cache))
    row("restart", cache)
    if args.long_ctx > 0:
        row("sinks+window", args.long_ctx, "--kv-window", str(args.window), "--kv-sinks",
            str(args.sinks))
        row("window", args.long_ctx, "--kv-window", str(cache))
    for r in rows:
        r["vs_full"] = r["perplexity"] / full["perplexity"]
    print(json.dumps({"bench": "kv_window", "model": os.path.relpath(args.model, REPO),
                      "text": os.path.relpath(args.file, REPO), "window": args.window,
                      "sinks": args.sinks,
                      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                      "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
