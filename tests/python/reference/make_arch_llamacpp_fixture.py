"""Record llama.cpp's greedy tokens and top-5 log-probabilities on the tiny architecture models and
on Gemma 3 270M, as tests/python/data/arch_llamacpp_fixture.json.

test_reference_selfcheck.py compares reference.llama_ref with these numbers, so that the reference's
reading of each architecture (RoPE mode and bases, sliding window, norms, scales, biases, Llama 3
RoPE factors, Q5/K-quant dequantization through gguf.quants) is checked against a second,
unrelated implementation without needing llama.cpp in CI.

How: each tiny model is written by reference.tiny_arch_model (the fixture stores its arguments and
the file's SHA-256, so the test can rebuild the identical file), served by ``llama-server``
(``-fa off -ctk f32 -ctv f32 --swa-full``: float32 KV cache, plain attention, whole-context KV for
sliding-window layers; the window is applied by the mask), and asked for ``/completion`` with the
prompt as token ids, ``temperature 0`` (greedy), ``n_probs 5`` and ``n_predict 8`` (``ignore_eos``); each
generated token's ``top_logprobs`` are log-softmax values of the logits it was chosen from. The Gemma prompts
are tokenized by llama.cpp's own tokenizer (``/tokenize`` with special tokens, then BOS 2 first).

Run (needs a llama.cpp build; from tests/python):
  python3 -m reference.make_arch_llamacpp_fixture --llama-bin DIR_WITH_llama-server
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from .tiny_arch_model import write_tiny_arch_model

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent.parent
OUT = HERE.parent / "data" / "arch_llamacpp_fixture.json"
GEMMA = REPO / "models" / "gemma-3-270m-q4_k_m.gguf"

TINY_SEED = 31
N_PREDICT = 8
N_PROBS = 5
# (id, arch, weight type, writer keyword arguments)
TINY = [
    ("llama3-F32", "llama", "F32", {}),
    ("llama-linear4-F32", "llama", "F32", {"rope_freqs": False, "rope_scaling_factor": 4.0}),
    ("qwen2-F32", "qwen2", "F32", {}),
    ("qwen3-F32", "qwen3", "F32", {}),
    ("gemma3-F32", "gemma3", "F32", {}),
    ("gemma3-swabase-softcap-F32", "gemma3", "F32",
     {"rope_freq_base_swa": 5000.0, "final_logit_softcapping": 15.0}),
    ("gemma3-Q4_K", "gemma3", "Q4_K", {}),
    ("llama3-Q6_K", "llama", "Q6_K", {}),
    ("llama3-Q2_K", "llama", "Q2_K", {}),
    ("qwen2-Q5_K", "qwen2", "Q5_K", {}),
    ("qwen2-Q5_0", "qwen2", "Q5_0", {}),
    ("qwen3-Q3_K", "qwen3", "Q3_K", {}),
    ("qwen3-Q5_1", "qwen3", "Q5_1", {}),
]
GEMMA_TEXTS = ["The capital of France is",
               "A short history of the printing press: in 1440, Johannes Gutenberg"]


def tiny_prompt() -> list[int]:
    return [int(t) for t in np.random.default_rng(5).integers(3, 300, 40)]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


class Server:
    def __init__(self, bindir: Path, model: Path, port: int, ctx: int = 512):
        env = dict(os.environ, LD_LIBRARY_PATH=str(bindir))
        self.port = port
        self.proc = subprocess.Popen(
            [str(bindir / "llama-server"), "-m", str(model), "--port", str(port), "-c", str(ctx),
             "-t", "2", "-fa", "off", "-ctk", "f32", "-ctv", "f32", "--swa-full", "--no-warmup",
             "-np", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                return
            except Exception:
                time.sleep(0.1)
        self.close()
        raise RuntimeError("llama-server did not start")

    def post(self, route: str, body: dict) -> dict:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{route}", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        return json.load(urllib.request.urlopen(req, timeout=600))

    def complete(self, ids: list[int], n_predict: int = N_PREDICT, n_probs: int = N_PROBS) -> dict:
        """Greedy tokens and, per step, the top-N (id, logprob). The server leaves out the
        probabilities of a token whose bytes do not complete a UTF-8 character (it reports them
        merged into the next one's), so such steps get ``null``: entries are matched to steps
        by token id, in order."""
        d = self.post("/completion", {"prompt": ids, "n_predict": n_predict, "temperature": 0,
                                      "n_probs": n_probs, "cache_prompt": False, "ignore_eos": True,
                                      "return_tokens": True})
        assert d["tokens_evaluated"] == len(ids), d["tokens_evaluated"]
        greedy = [int(t) for t in d["tokens"]]
        assert len(greedy) == n_predict
        steps: list = [None] * len(greedy)
        k = 0
        for s in d["completion_probabilities"]:
            while greedy[k] != s["id"]:
                k += 1
            steps[k] = [[t["id"], t["logprob"]] for t in s["top_logprobs"]]
            k += 1
        return {"greedy": greedy, "top_logprobs": steps}

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m reference.make_arch_llamacpp_fixture")
    ap.add_argument("--llama-bin", default=str(REPO / "bench" / ".cache" / "llama-build" / "bin"))
    ap.add_argument("--port", type=int, default=18437)
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args(argv)
    bindir = Path(a.llama_bin)
    ver = subprocess.run([str(bindir / "llama-server"), "--version"], capture_output=True, text=True,
                         env=dict(os.environ, LD_LIBRARY_PATH=str(bindir)))
    version = " ".join((ver.stdout + ver.stderr).split())
    out = {"llama_cpp_version": version,
           "server_flags": "-c 512 -t 2 -fa off -ctk f32 -ctv f32 --swa-full -np 1",
           "request": {"temperature": 0, "n_predict": N_PREDICT, "n_probs": N_PROBS, "ignore_eos": True},
           "tiny_seed": TINY_SEED, "tiny_prompt": tiny_prompt(), "tiny": [], "gemma": None}
    with tempfile.TemporaryDirectory() as tmp:
        for cid, arch, wt, kw in TINY:
            path = Path(tmp) / f"{cid}.gguf"
            kw = dict(kw, ascii_vocab=True)
            write_tiny_arch_model(str(path), arch, seed=TINY_SEED, weight_type=wt, **kw)
            srv = Server(bindir, path, a.port)
            try:
                res = srv.complete(out["tiny_prompt"])
            finally:
                srv.close()
            out["tiny"].append({"id": cid, "arch": arch, "weight_type": wt, "kwargs": kw,
                                "sha256": sha256(path), **res})
            print(cid, res["greedy"])
    if GEMMA.exists():
        srv = Server(bindir, GEMMA, a.port)
        try:
            prompts = []
            for text in GEMMA_TEXTS:
                ids = srv.post("/tokenize", {"content": text, "add_special": True})["tokens"]
                if ids[:1] != [2]:
                    ids = [2] + ids
                prompts.append({"text": text, "ids": ids, **srv.complete(ids)})
                print(text, ids, prompts[-1]["greedy"])
        finally:
            srv.close()
        out["gemma"] = {"file": GEMMA.name, "sha256": sha256(GEMMA), "prompts": prompts}
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
