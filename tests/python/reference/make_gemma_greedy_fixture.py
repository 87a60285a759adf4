"""Record llama.cpp's first 32 greedy tokens on Gemma 3 270M for a few prompts, with the top-2
log-probabilities of every step (so that a difference can be told apart from a near-tie), into
tests/python/data/gemma_greedy_llamacpp.json for test_gemma_llamacpp.py.

llama-server (built by bench/llama_cpp_build.py into bench/.cache/llama-build/bin) runs the file
with the flags of make_arch_llamacpp_fixture's Server (f32 KV cache, flash attention off, the full
sliding-window cache, 2 threads); the prompt is given as token ids (BOS included), temperature 0,
ignore_eos.

Run from tests/python:  python3 -m reference.make_gemma_greedy_fixture
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from .make_arch_llamacpp_fixture import GEMMA, REPO, Server, sha256

OUT = Path(__file__).resolve().parent.parent / "data" / "gemma_greedy_llamacpp.json"
N_PREDICT = 32
# The last prompt is longer than the model's 512-token sliding window, so the sliding-window
# layers attend to a part of it only.
LONG = " ".join(f"Item {i}: the {['red', 'green', 'blue', 'amber'][i % 4]} box holds {i * 7} stones."
                for i in range(60)) + " The box that holds 112 stones is"
PROMPTS = ["The capital of France is",
           "Once upon a time, in a small village by the sea,",
           "def fibonacci(n):\n",
           "The three primary colors are",
           LONG]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m reference.make_gemma_greedy_fixture")
    ap.add_argument("--llama-bin", default=str(REPO / "bench" / ".cache" / "llama-build" / "bin"))
    ap.add_argument("--port", type=int, default=18438)
    a = ap.parse_args(argv)
    bindir = Path(a.llama_bin)
    ver = subprocess.run([str(bindir / "llama-server"), "--version"], capture_output=True,
                         text=True, env=dict(os.environ, LD_LIBRARY_PATH=str(bindir)))
    srv = Server(bindir, GEMMA, a.port, ctx=2048)
    prompts = []
    try:
        for text in PROMPTS:
            ids = srv.post("/tokenize", {"content": text, "add_special": True})["tokens"]
            if ids[:1] != [2]:
                ids = [2] + ids
            res = srv.complete(ids, n_predict=N_PREDICT, n_probs=2)
            greedy = res["greedy"]
            steps = res["top_logprobs"]
            prompts.append({"text": text, "ids": ids, "greedy": greedy, "top2": steps})
            print(text, greedy)
    finally:
        srv.close()
    out = {"llama_cpp_version": " ".join((ver.stdout + ver.stderr).split()),
           "server_flags": "-c 2048 -t 2 -fa off -ctk f32 -ctv f32 --swa-full -np 1",
           "file": GEMMA.name, "sha256": sha256(GEMMA), "n_predict": N_PREDICT,
           "prompts": prompts}
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", OUT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
