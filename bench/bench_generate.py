#!/usr/bin/env python3
"""End-to-end prefill and decode speed of `cortexstream generate` next to llama.cpp.

Both engines run the same GGUF file, the same number of prompt tokens and decode steps, with the
same thread count, in the same run; samples of the two are interleaved so that load from other
processes hits both alike. Prints one JSON object on stdout (progress on stderr).

  pp (prefill, like llama-bench pp512): a prompt of --prompt-tokens tokens, one forward pass per
     512-token chunk, logits of the last position only. CortexStream: `generate --max-tokens 1`,
     its own `prefill_tokens_per_s`.
  tg (decode, like llama-bench tg128): after a short prompt, --gen-tokens steps of one token.
     CortexStream: `generate --max-tokens GEN+1 --ignore-eos --temperature 0`, its own
     `decode_tokens_per_s` (GEN forward passes, each with a greedy argmax over the vocabulary).

The llama.cpp side (--peer):
  llama-bench (default): llama.cpp's own benchmark tool, built from the pinned llama.cpp source
     on first use (bench/llama_cpp_build.py). pp: `llama-bench -p PROMPT -n 0 -r 1 --no-warmup
     -o json` (random token ids, one 512-token batch per 512 tokens). tg: `llama-bench -p 0
     -n GEN -d D -r 1 --no-warmup -o json`, D = the short prompt's length: D positions are
     computed untimed first, as CortexStream's short prompt is; its decode steps feed random
     token ids back and do not sample.
  llama-cpp-python: the Python bindings (pip-installed from bench/requirements.txt when
     missing). pp: Llama.eval(ids) of the same prompt ids after a reset (n_batch 512). tg: GEN x
     (argmax of the last logits, Llama.eval([token])), after the same short prompt; the greedy
     tokens of both engines are compared.

--formats q4_1,q4_0,q8_0 measures each format: the --model file for the format its name states,
the others made from it by `llama-quantize --allow-requantize` into bench/.cache/models/ (once).
Without --formats, the --model file alone.

Every sample is cold in the same way on both sides: a fresh `cortexstream` process and a fresh
llama-bench process or llama_cpp.Llama object (model mmapped from the page cache, no warm-up
pass). Model load time is not counted on either side. Medians of --repeats samples are reported,
with all samples.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from llama_cpp_build import (default_tool_path, ensure_llama_tool, llama_info, model_for_format,
                             model_format, parse_formats)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_LLAMA_BENCH_BIN = default_tool_path("llama-bench")
DEFAULT_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_BIN = ROOT / "build" / "src" / "cli" / "cortexstream"
REQUIREMENTS = ROOT / "bench" / "requirements.txt"
# Built from source at pip install time; GGML_NATIVE matches our -march=native build.
LLAMA_CMAKE_ARGS = "-DGGML_NATIVE=ON"
DECODE_PROMPT = "Once upon a time, in a small village by the sea, there lived"

# Plain English without special-token text; repeated and cut to length for the prefill prompt.
FILLER = (
    "The history of computing is a story of people trying to make machines do arithmetic faster "
    "and more reliably than any clerk could. Early mechanical calculators used gears and levers; "
    "later, relays and vacuum tubes switched electric currents to represent numbers. The "
    "transistor made computers smaller, cheaper and far less prone to failure, and the "
    "integrated circuit put thousands, then billions, of transistors on a single chip. Software "
    "grew alongside the hardware: assembly languages gave way to compilers, operating systems "
    "learned to share one processor among many programs, and networks let machines on different "
    "continents exchange messages in a fraction of a second. Today a phone in a pocket holds more "
    "memory than the largest installations of fifty years ago, and language models that once "
    "needed a data centre can answer questions on an ordinary laptop. Yet the basic ideas remain "
    "the same: represent information as bits, transform it with simple operations, and repeat "
    "those operations very quickly. Engineers still argue about caches, memory bandwidth and "
    "instruction sets, because the speed of a program depends less on how many operations it "
    "performs than on how often it waits for data to arrive from memory."
).split()


def log(msg: str) -> None:
    print(f"[bench_generate] {msg}", file=sys.stderr, flush=True)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else 0.0


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    flags: list[str] = []
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name") and cpu in ("", platform.machine()):
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = line.split(":", 1)[1].split()
    except OSError:
        pass
    simd = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                        "avx512_bf16", "avx_vnni", "amx_tile") if f in flags]
    return {"cpu": cpu, "cores": os.cpu_count(), "simd": simd, "kernel": platform.release(),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()]}


def git_state() -> dict:
    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True,
                              check=False).stdout.strip()
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "--short", "HEAD"), "dirty_tracked_files": bool(dirty)}


# --- CortexStream -------------------------------------------------------------------------------

def cs_run(args: argparse.Namespace, model: Path, prompt: str, max_tokens: int) -> dict:
    cmd = [str(args.bin), "generate", "--model", str(model), "--prompt", prompt,
           "--temperature", "0", "--max-tokens", str(max_tokens), "--ignore-eos", "--json",
           "--threads", str(args.threads)]
    p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"cortexstream generate failed ({p.returncode}): {p.stderr.strip()}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def cs_tokenize_many(args: argparse.Namespace, texts: list[str]) -> list[list[int]]:
    """Token ids exactly as `generate` encodes its prompt (BOS per the model, special tokens on)."""
    p = subprocess.run([str(args.bin), "tokenize", "--model", str(args.model), "--lines-json"],
                       input="".join(json.dumps(t) + "\n" for t in texts), capture_output=True,
                       text=True, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"cortexstream tokenize failed ({p.returncode}): {p.stderr.strip()}")
    out = [json.loads(line)["ids"] for line in p.stdout.splitlines() if line.strip()]
    if len(out) != len(texts):
        raise RuntimeError("cortexstream tokenize --lines-json returned a wrong number of lines")
    return out


def build_prefill_prompt(args: argparse.Namespace) -> tuple[str, list[int]]:
    """The prefix of the filler text (whole words) whose token count is nearest --prompt-tokens."""
    target = args.prompt_tokens
    words = (FILLER * (target // len(FILLER) + 2))[: max(8, target * 2)]
    lo, hi = max(1, target // 2), min(len(words), target * 3 // 2 + 8)
    texts = [" ".join(words[:k]) for k in range(lo, hi + 1)]
    ids = cs_tokenize_many(args, texts)
    best = min(range(len(texts)), key=lambda i: (abs(len(ids[i]) - target), len(ids[i]) > target))
    return texts[best], ids[best]


# --- llama.cpp ----------------------------------------------------------------------------------

def import_llama(args: argparse.Namespace):
    try:
        import llama_cpp  # noqa: PLC0415
        return llama_cpp
    except ImportError:
        pass
    if args.no_install:
        raise RuntimeError("llama_cpp is not importable and --no-install was given")
    env = dict(os.environ)
    env.setdefault("CMAKE_ARGS", LLAMA_CMAKE_ARGS)
    log(f"installing {REQUIREMENTS} (CMAKE_ARGS={env['CMAKE_ARGS']}); llama.cpp compiles from "
        "source, this takes many minutes on few cores...")
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "pip", "install", "-r", str(REQUIREMENTS)], env=env,
                       check=False)
    if p.returncode != 0:
        raise RuntimeError("pip install of llama-cpp-python failed; rerun with --skip-llama")
    log(f"installed in {time.perf_counter() - t0:.0f} s")
    import llama_cpp  # noqa: PLC0415
    return llama_cpp


class LlamaSide:
    def __init__(self, llama_cpp, args: argparse.Namespace):
        import numpy as np  # noqa: PLC0415  (a llama-cpp-python dependency)
        self.np = np
        self.lc = llama_cpp
        self.args = args
        self.n_vocab = 0
        self.ctx_info: dict = {}

    def new(self, model: Path | None = None):
        kw = dict(model_path=str(model or self.args.model), n_ctx=2048, n_threads=self.args.threads,
                  n_threads_batch=self.args.threads, n_batch=512, verbose=False, logits_all=False,
                  flash_attn=self.args.llama_flash_attn)
        try:
            llm = self.lc.Llama(**kw)
        except TypeError:  # a version without logits_all
            kw.pop("logits_all")
            llm = self.lc.Llama(**kw)
        self.n_vocab = llm.n_vocab()
        if not self.ctx_info:
            cp = llm.context_params
            for name in ("n_ctx", "n_batch", "n_ubatch", "n_threads", "n_threads_batch",
                         "flash_attn", "flash_attn_type", "type_k", "type_v"):
                if hasattr(cp, name):
                    v = getattr(cp, name)
                    self.ctx_info[name] = v if isinstance(v, (int, float, bool)) else str(v)
        return llm

    def tokenize(self, text: str) -> list[int]:
        llm = self.new()
        ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        del llm
        return list(ids)

    def last_logits(self, llm):
        ptr = self.lc.llama_get_logits_ith(llm.ctx, -1)
        return self.np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def prefill(self, model: Path, ids: list[int]) -> float:
        llm = self.new(model)
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        dt = time.perf_counter() - t0
        del llm
        return len(ids) / dt

    def decode(self, model: Path, prompt_ids: list[int], steps: int) -> tuple[float, list[int]]:
        llm = self.new(model)
        llm.reset()
        llm.eval(prompt_ids)
        tokens: list[int] = []
        t0 = time.perf_counter()
        for _ in range(steps):
            tok = int(self.np.argmax(self.last_logits(llm)))
            tokens.append(tok)
            llm.eval([tok])
        tokens.append(int(self.np.argmax(self.last_logits(llm))))
        dt = time.perf_counter() - t0
        del llm
        return steps / dt, tokens


class LlamaBenchSide:
    """llama.cpp's llama-bench, one test per process (-r 1, no warm-up pass)."""

    def __init__(self, args: argparse.Namespace, binary: Path):
        self.args = args
        self.binary = binary
        self.settings: dict = {}

    def run(self, model: Path, extra: list[str]) -> float:
        cmd = [str(self.binary), "-m", str(model), "-t", str(self.args.threads), "-r", "1",
               "--no-warmup", "-o", "json", *extra]
        p = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if p.returncode != 0:
            raise RuntimeError(f"llama-bench failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
        tests = json.loads(p.stdout)
        if len(tests) != 1:
            raise RuntimeError(f"llama-bench printed {len(tests)} tests, expected 1")
        t = tests[0]
        if not self.settings:
            self.settings = {k: t[k] for k in ("build_commit", "build_number", "cpu_info",
                                               "backends", "n_batch", "n_ubatch", "n_threads",
                                               "flash_attn", "type_k", "type_v", "repack")
                             if k in t}
        return float(t["avg_ts"])

    def prefill(self, model: Path, n_prompt: int) -> float:
        return self.run(model, ["-p", str(n_prompt), "-n", "0"])

    def decode(self, model: Path, depth: int, steps: int) -> float:
        return self.run(model, ["-p", "0", "-n", str(steps), "-d", str(depth)])


def llama_version(llama_cpp) -> str:
    v = getattr(llama_cpp, "__version__", None)
    if v:
        return str(v)
    from importlib.metadata import version  # noqa: PLC0415
    return version("llama_cpp_python")


# --- main ---------------------------------------------------------------------------------------

def summary(pp: list[float], tg: list[float]) -> dict:
    return {"prefill_tokens_per_s": round(median(pp), 2), "decode_tokens_per_s": round(median(tg), 2),
            "prefill_samples": [round(x, 2) for x in pp], "decode_samples": [round(x, 2) for x in tg]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--repeats", type=int, default=3, help="samples per measurement (median)")
    ap.add_argument("--threads", type=int, default=2, help="threads for both engines")
    ap.add_argument("--prompt-tokens", type=int, default=512, help="prefill prompt length")
    ap.add_argument("--gen-tokens", type=int, default=128, help="decode steps")
    ap.add_argument("--bin", type=Path, default=DEFAULT_BIN, help="cortexstream binary")
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="GGUF model file")
    ap.add_argument("--formats", default=None,
                    help="comma-separated formats to measure (q4_1, q4_0, q8_0): the --model "
                         "file for the format its name states, the others re-quantized from it "
                         "(default: the --model file alone)")
    ap.add_argument("--peer", choices=["llama-bench", "llama-cpp-python"], default="llama-bench",
                    help="how llama.cpp is measured (default llama-bench)")
    ap.add_argument("--llama-bench-bin", type=Path, default=DEFAULT_LLAMA_BENCH_BIN,
                    help="llama-bench binary (built into bench/.cache when missing at the "
                         "default path)")
    ap.add_argument("--skip-llama", action="store_true", help="measure CortexStream only")
    ap.add_argument("--llama-flash-attn", action="store_true",
                    help="llama-cpp-python peer: turn on flash attention (its default: off)")
    ap.add_argument("--no-install", action="store_true",
                    help="llama-cpp-python peer: fail instead of pip-installing "
                         "bench/requirements.txt when llama_cpp is missing")
    args = ap.parse_args()
    args.model = args.model.resolve()
    if args.repeats < 1 or args.threads < 1 or args.prompt_tokens < 1 or args.gen_tokens < 1:
        ap.error("--repeats, --threads, --prompt-tokens and --gen-tokens must be >= 1")

    if not args.bin.exists():
        ap.error(f"{args.bin} not found: build it (scripts/build.sh release cortexstream) or pass "
                 "--bin")
    if not args.model.exists():
        if args.model.resolve() == DEFAULT_MODEL.resolve():
            subprocess.run([str(ROOT / "scripts" / "fetch_model.sh")], check=True)
        else:
            ap.error(f"{args.model} not found")
    try:
        formats = parse_formats(args.formats) if args.formats else None
    except RuntimeError as e:
        ap.error(str(e))

    python_side = None
    bench_side = None
    llama_cpp = None
    skip_reason = "--skip-llama given" if args.skip_llama else None
    llama_build = None
    if not args.skip_llama and args.peer == "llama-cpp-python":
        llama_cpp = import_llama(args)
        python_side = LlamaSide(llama_cpp, args)
    elif not args.skip_llama:
        if not args.llama_bench_bin.exists():
            if args.llama_bench_bin.resolve() != DEFAULT_LLAMA_BENCH_BIN.resolve():
                ap.error(f"{args.llama_bench_bin}: not found")
            _, llama_build = ensure_llama_tool("llama-bench")
        bench_side = LlamaBenchSide(args, args.llama_bench_bin)
    has_peer = python_side is not None or bench_side is not None

    if formats is None:
        models = {(model_format(args.model) or "model").lower(): args.model}
    else:
        models = {f.lower(): model_for_format(args.model, f) for f in formats}

    machine = machine_info()
    pp_text, pp_ids = build_prefill_prompt(args)
    tg_ids = cs_tokenize_many(args, [DECODE_PROMPT])[0]
    log(f"prefill prompt: {len(pp_ids)} tokens; decode prompt: {len(tg_ids)} tokens, "
        f"{args.gen_tokens} steps; threads {args.threads}; {args.repeats} repeats; formats "
        f"{', '.join(models)}; peer {'none' if not has_peer else args.peer}")

    tokenizers_agree = None
    if python_side:
        tokenizers_agree = (python_side.tokenize(pp_text) == pp_ids
                            and python_side.tokenize(DECODE_PROMPT) == tg_ids)

    per_format: dict = {}
    for fmt, model in models.items():
        cs_pp: list[float] = []
        cs_tg: list[float] = []
        ll_pp: list[float] = []
        ll_tg: list[float] = []
        cs_tokens: list[int] = []
        ll_tokens: list[int] = []
        for r in range(args.repeats):
            j = cs_run(args, model, pp_text, 1)
            if j["prompt_tokens"] != len(pp_ids):
                raise RuntimeError(f"generate saw {j['prompt_tokens']} prompt tokens, "
                                   f"tokenize {len(pp_ids)}")
            cs_pp.append(j["prefill_tokens_per_s"])
            if python_side:
                ll_pp.append(python_side.prefill(model, pp_ids))
            elif bench_side:
                ll_pp.append(bench_side.prefill(model, len(pp_ids)))
            j = cs_run(args, model, DECODE_PROMPT, args.gen_tokens + 1)
            if j["completion_tokens"] != args.gen_tokens + 1:
                raise RuntimeError(f"generate made {j['completion_tokens']} tokens, "
                                   f"expected {args.gen_tokens + 1}")
            cs_tg.append(j["decode_tokens_per_s"])
            cs_tokens = j["tokens"]
            if python_side:
                rate, ll_tokens = python_side.decode(model, tg_ids, args.gen_tokens)
                ll_tg.append(rate)
            elif bench_side:
                ll_tg.append(bench_side.decode(model, len(tg_ids), args.gen_tokens))
            log(f"{fmt} repeat {r + 1}/{args.repeats}: cortexstream pp {cs_pp[-1]:.1f} tg "
                f"{cs_tg[-1]:.1f}"
                + (f"; llama.cpp pp {ll_pp[-1]:.1f} tg {ll_tg[-1]:.1f}" if has_peer else ""))

        entry: dict = {
            "model": str(model.relative_to(ROOT) if model.resolve().is_relative_to(ROOT)
                         else model),
            "cortexstream": summary(cs_pp, cs_tg),
        }
        if has_peer:
            entry["llama_cpp"] = summary(ll_pp, ll_tg)
            entry["ratios"] = {
                "prefill": round(median(cs_pp) / median(ll_pp), 3),
                "decode": round(median(cs_tg) / median(ll_tg), 3),
                "meaning": "cortexstream / llama.cpp tokens/s (> 1: cortexstream faster)",
            }
        if python_side:
            n = min(len(cs_tokens), len(ll_tokens))
            first_diff = next((i for i in range(n) if cs_tokens[i] != ll_tokens[i]), None)
            entry["greedy_decode_agreement"] = {
                "tokens_compared": n,
                "first_mismatch_index": first_diff,
                "note": "same prompt ids, greedy; the engines round differently, so the paths "
                        "may part at a near-tie; the work per step is the same either way",
            }
        per_format[fmt] = entry

    machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    if bench_side:
        peer_protocol = ("llama.cpp: a fresh llama-bench process per sample (-r 1 --no-warmup); "
                         "pp = -p PROMPT -n 0 (random ids); tg = -p 0 -n GEN -d DECODE_PROMPT "
                         "(the depth computed untimed, random ids fed back, no sampling)")
    elif python_side:
        peer_protocol = ("llama.cpp: a fresh llama_cpp.Llama per sample, the same prompt ids; "
                         "decode = greedy argmax + Llama.eval([token])")
    else:
        peer_protocol = "llama.cpp: not measured"
    out: dict = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "threads": args.threads,
        "model": str(args.model.relative_to(ROOT) if args.model.resolve().is_relative_to(ROOT)
                     else args.model),
        "prompt_tokens": len(pp_ids),
        "decode_prompt_tokens": len(tg_ids),
        "gen_tokens": args.gen_tokens,
        "repeats": args.repeats,
        "peer": args.peer if has_peer else None,
        "protocol": "interleaved samples; each sample a fresh cortexstream process (no warm-up "
                    "pass); model load not timed; prefill = last-position logits only, 512-token "
                    "batches; cortexstream decode = greedy argmax + 1-token forward per step; "
                    f"medians of the samples. {peer_protocol}",
        "cortexstream": {"bin": str(args.bin),
                         # the checkout now; the binary may have been built from another state
                         "repo_at_run_time": git_state(),
                         "build": "CMake Release, -O3 -march=native"},
    }
    if python_side:
        out["llama_cpp"] = {
            "peer": "llama-cpp-python",
            "version": llama_version(llama_cpp),
            "build": f"llama-cpp-python compiled from source by pip (bench/requirements.txt); "
                     f"install CMAKE_ARGS={LLAMA_CMAKE_ARGS} unless already installed otherwise; "
                     "see system_info",
            "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
            "context": python_side.ctx_info,
        }
        out["tokenizers_agree"] = tokenizers_agree  # both sides are fed CortexStream's ids anyway
    elif bench_side:
        out["llama_cpp"] = {"peer": "llama-bench", **llama_info(args.llama_bench_bin),
                            "settings": bench_side.settings}
        if llama_build:
            out["llama_cpp"]["built_now"] = llama_build
    else:
        out["llama_cpp"] = {"skipped": True, "reason": skip_reason}
    out["formats"] = per_format
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RuntimeError as e:
        log(f"error: {e}")
        sys.exit(1)
