#!/usr/bin/env python3
"""Perplexity next to llama.cpp's `llama-perplexity`: same GGUF, same text, same window.

Runs

  cortexstream perplexity --method llama.cpp --ctx C --file F --threads T
  llama-perplexity -m MODEL -f F -c C -b C -t T -tb T

and prints one JSON object with both figures (llama-perplexity's "Final estimate"), their ratio
(cortexstream / llama.cpp) and whether they agree within --tolerance (1%). `--method llama.cpp`
scores the same tokens llama-perplexity does (whole chunks of C tokens, second half of each;
docs/cli.md), so the two figures differ only by the engines' numerics and tokenizers; the chunk
counts of both are reported as a check that they cut the text alike.

The default text, bench/data/perplexity.txt, is this repository's own README.md and docs/*.md
concatenated (~14k tokens of the default model: 27 windows of 512).

When the llama-perplexity binary is missing, it is built from the llama.cpp source vendored by
the pinned llama-cpp-python sdist (bench/llama_cpp_build.py): several minutes on two cores.
Prints one JSON object on stdout; progress goes to stderr; llama-perplexity's log goes to
bench/out/perplexity-llama.log.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from llama_cpp_build import (build_llama_tool, cpu_name, default_tool_path, git_commit,
                             llama_info)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_BIN = ROOT / "build" / "src" / "cli" / "cortexstream"
DEFAULT_TEXT = ROOT / "bench" / "data" / "perplexity.txt"
DEFAULT_LLAMA_BIN = default_tool_path("llama-perplexity")
OUT_DIR = ROOT / "bench" / "out"


def log(msg: str) -> None:
    print(f"[bench_perplexity {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def rel(path: Path) -> str:
    """`path` relative to the repository when it is inside it (links not followed)."""
    path = Path(os.path.abspath(path))
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def run_cortexstream(cmd: list[str]) -> dict:
    log(" ".join(cmd))
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"cortexstream exited with {p.returncode}: {p.stderr.strip()}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out["wall_s"] = round(wall, 2)
    return out


def parse_llama_log(text: str) -> dict:
    """llama-perplexity's final estimate (and its +/-) and how many chunks it scored."""
    m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", text)
    if not m:
        raise RuntimeError("no 'Final estimate: PPL = ...' line in llama-perplexity's output")
    chunks = re.search(r"calculating perplexity over (\d+) chunks", text)
    return {"perplexity": float(m.group(1)), "plus_minus": float(m.group(2)),
            "chunks": int(chunks.group(1)) if chunks else None}


def run_llama(cmd: list[str]) -> dict:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    log_path = OUT_DIR / "perplexity-llama.log"
    log(f"{' '.join(cmd)}  (log: {rel(log_path)})")
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    log_path.write_text(p.stdout + p.stderr)
    if p.returncode != 0:
        raise RuntimeError(f"llama-perplexity exited with {p.returncode} (see {rel(log_path)})")
    out = parse_llama_log(p.stdout + p.stderr)
    out.update({"wall_s": round(wall, 2), "log": rel(log_path)})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL), help="GGUF model")
    ap.add_argument("--bin", default=str(DEFAULT_BIN), help="cortexstream binary")
    ap.add_argument("--llama-perplexity-bin", default=str(DEFAULT_LLAMA_BIN),
                    help="llama-perplexity binary (built into bench/.cache when missing at the "
                         "default path)")
    ap.add_argument("--file", default=str(DEFAULT_TEXT), help="UTF-8 text to score")
    ap.add_argument("--ctx", type=int, default=512, help="window (chunk) length in tokens")
    ap.add_argument("--threads", type=int, default=2, help="compute threads of each side")
    ap.add_argument("--tolerance", type=float, default=0.01,
                    help="relative difference counted as agreement (default 0.01)")
    args = ap.parse_args()

    model, text, cs_bin = Path(args.model), Path(args.file), Path(args.bin)
    for path, hint in [(model, "scripts/fetch_model.sh fetches the default model"),
                       (text, "--file"), (cs_bin, "scripts/build.sh release cortexstream, or --bin")]:
        if not path.exists():
            print(f"{path}: not found ({hint})", file=sys.stderr)
            return 2

    report: dict = {
        "bench": "perplexity",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": {"cpu": cpu_name(), "cores": os.cpu_count()},
        "cortexstream_commit": git_commit(),
        "model": rel(model),
        "text": {"file": rel(text), "bytes": text.stat().st_size,
                 "sha256": hashlib.sha256(text.read_bytes()).hexdigest()},
        "ctx": args.ctx,
        "threads": args.threads,
    }

    llama_bin = Path(args.llama_perplexity_bin)
    if not llama_bin.exists():
        if llama_bin.resolve() != DEFAULT_LLAMA_BIN.resolve():
            print(f"{llama_bin}: not found", file=sys.stderr)
            return 2
        try:
            report["llama_build"] = build_llama_tool("llama-perplexity")
        except (subprocess.CalledProcessError, RuntimeError, OSError) as e:
            print(f"building llama-perplexity failed: {e}", file=sys.stderr)
            return 3
    report["llama_cpp"] = llama_info(llama_bin)

    cs_cmd = [str(cs_bin), "perplexity", "--model", str(model), "--file", str(text), "--ctx",
              str(args.ctx), "--method", "llama.cpp", "--threads", str(args.threads)]
    llama_cmd = [str(llama_bin), "-m", str(model), "-f", str(text), "-c", str(args.ctx), "-b",
                 str(args.ctx), "-t", str(args.threads), "-tb", str(args.threads)]
    try:
        cs = run_cortexstream(cs_cmd)
        llama = run_llama(llama_cmd)
    except (RuntimeError, OSError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    report["cortexstream"] = dict(cs, command=cs_cmd)
    report["llama"] = dict(llama, command=llama_cmd)
    ratio = cs["perplexity"] / llama["perplexity"]
    report["ratio_cortexstream_over_llama"] = round(ratio, 5)
    report["within_tolerance"] = abs(ratio - 1) <= args.tolerance
    report["same_chunk_count"] = cs["windows"] == llama["chunks"]
    log(f"cortexstream {cs['perplexity']:.4f} ({cs['windows']} windows), llama-perplexity "
        f"{llama['perplexity']:.4f} ({llama['chunks']} chunks), ratio {ratio:.5f}")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
