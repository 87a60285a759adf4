"""Gemma 3 270M's first 32 greedy tokens against llama.cpp's, recorded by
reference/make_gemma_greedy_fixture.py (llama-server at temperature 0, with the top-2
log-probabilities of every step).

Both engines quantize activations to 8 bits for the quantized matmuls, in different blocks
(CortexStream per 32 values, llama.cpp per 32 or per 256 for K-quants), so their logits differ by a
few tenths of a nat at most (measured against the float64 reference: 0.2 to 0.25 nats on this
file). The greedy tokens must therefore be identical up to the first step where llama.cpp's two
best tokens are within MARGIN_NATS of each other (a near-tie that either engine may break either
way), and the comparison stops there; a difference at a step with a clear winner fails. Both
precisions are checked; the prompts are tokenized by `cortexstream` and must give llama.cpp's ids.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
BIN = Path(os.environ.get("CORTEXSTREAM_BIN", REPO / "build" / "src" / "cli" / "cortexstream"))
FIXTURE = HERE / "data" / "gemma_greedy_llamacpp.json"
GEMMA = REPO / "models" / "gemma-3-270m-q4_k_m.gguf"
MARGIN_NATS = 0.25
FIX = json.loads(FIXTURE.read_text())


@pytest.fixture(scope="module", autouse=True)
def need_model():
    if not GEMMA.exists():
        pytest.fail(f"{GEMMA} missing: run scripts/fetch_model.sh gemma3-270m")


def run_json(*args: str) -> dict | list:
    proc = subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("precision", ["int8", "f32"])
@pytest.mark.parametrize("case", FIX["prompts"], ids=lambda c: c["text"][:24])
def test_greedy_tokens_match_llama_cpp_up_to_a_near_tie(case, precision):
    assert run_json("tokenize", "--model", str(GEMMA), case["text"]) == case["ids"]
    got = run_json("generate", "--model", str(GEMMA), "--prompt", case["text"], "--temperature",
                   "0", "--max-tokens", str(FIX["n_predict"]), "--ignore-eos", "--json",
                   "--precision", precision)["tokens"]
    want = case["greedy"]
    assert len(got) == len(want)
    for step, (a, b) in enumerate(zip(got, want)):
        if a == b:
            continue
        top2 = case["top2"][step]
        assert top2 is not None and len(top2) == 2, f"step {step}: no llama.cpp probabilities"
        margin = top2[0][1] - top2[1][1]
        assert margin < MARGIN_NATS, (
            f"step {step}: {a} instead of llama.cpp's {b}, whose lead over its second choice "
            f"{top2[1][0]} is {margin:.3f} nats (not a near-tie)")
        assert a == top2[1][0], f"step {step}: {a} is not llama.cpp's second choice {top2[1][0]}"
        assert step >= 8, f"the tokens differ as early as step {step}"
        break
