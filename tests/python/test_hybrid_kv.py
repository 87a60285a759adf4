"""The hybrid KV cache on Gemma 3 270M (15 sliding-window layers with a 512-token window, 3 global
layers): sliding-window layers keep only the blocks their window sees, and nothing a model computes
changes.

- Perplexity with and without the hybrid cache is bit-identical over windows long enough
  (1536 tokens, prefilled in steps of 512) for the windowed layers to give blocks back.
- `bench kv-footprint` reports, for one sequence, exactly the bytes that follow from the file's
  own metadata (read with the `gguf` package): global layers hold every position, a windowed layer
  the 16-token blocks from the one holding position T - 512 (the oldest key the next query reads)
  to the last.
- Through `serve`: a pool too small for a 3000-token request without the hybrid cache serves it
  with it (max_model_len and the refusal both follow from the same block arithmetic), and a long
  prompt sent twice is answered from the prefix cache (which must hold each window's blocks) with
  the same tokens.

Run from the repo root: python3 -m pytest -q tests/python/test_hybrid_kv.py
Needs models/gemma-3-270m-q4_k_m.gguf (scripts/fetch_model.sh gemma3-270m).
"""
from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import openai
import pytest
from gguf import GGUFReader

from test_server import BIN, REPO, Server

GEMMA = REPO / "models" / "gemma-3-270m-q4_k_m.gguf"
TEXT = REPO / "bench" / "data" / "perplexity.txt"
BLOCK = 16  # the engine's block size (tokens)
STEP = 512  # the engine's default tokens per step (prefill chunk)


def run(*args: str) -> dict:
    proc = subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def meta() -> dict:
    if not GEMMA.exists():
        pytest.fail(f"{GEMMA} missing: run scripts/fetch_model.sh gemma3-270m")
    r = GGUFReader(str(GEMMA))

    def scalar(key: str) -> int:
        f = r.fields[key]
        return int(f.parts[f.data[0]][0])

    layers = scalar("gemma3.block_count")
    # Gemma 3 (as llama.cpp reads it): every sixth layer is global, the others windowed.
    windowed = [(i + 1) % 6 != 0 for i in range(layers)]
    return {"layers": layers, "windowed": windowed,
            "window": scalar("gemma3.attention.sliding_window"),
            "kv_heads": scalar("gemma3.attention.head_count_kv"),
            "head_dim": scalar("gemma3.attention.key_length")}


def layer_row_bytes(m: dict) -> int:
    """K and V of one token in one layer, f16."""
    return 2 * m["kv_heads"] * m["head_dim"] * 2


def held_bytes(m: dict, tokens: int, hybrid: bool) -> int:
    """KV bytes one sequence of `tokens` positions holds while decoding, its last step having
    appended position T - 1 (T = tokens), whose query reads keys (T - 1 - W, T - 1]: every block
    of a global layer; for a windowed layer, the blocks from the one holding position T - W to the
    last."""
    blocks = math.ceil(tokens / BLOCK)
    total = 0
    for w in m["windowed"]:
        if hybrid and w:
            first = max(0, tokens - 1 - m["window"] + 1) // BLOCK
            total += blocks - first
        else:
            total += blocks
    return total * BLOCK * layer_row_bytes(m)


def test_perplexity_is_bit_identical_with_and_without_the_hybrid_cache(tmp_path, meta):
    text = tmp_path / "text.txt"
    text.write_bytes(TEXT.read_bytes()[:6500])  # ~1500 tokens per window, two windows
    args = ("perplexity", "--model", str(GEMMA), "--file", str(text), "--ctx", "1536")
    hybrid = run(*args)
    full = run(*args, "--no-hybrid-kv")
    assert hybrid["windows"] >= 2
    assert hybrid["perplexity"] == full["perplexity"]


def test_kv_footprint_follows_from_the_file(meta):
    out = run("bench", "kv-footprint", "--model", str(GEMMA), "--json")
    assert out["layers_per_block"] == 3
    assert [g["window"] for g in out["groups"]] == [0] + [meta["window"]] * 5
    assert sorted(sum((g["layers"] for g in out["groups"]), [])) == list(range(meta["layers"]))
    rows = {r["tokens"]: r for r in out["sequences"]}
    assert sorted(rows) == [512, 4096, 32768]
    for tokens, r in rows.items():
        assert r["full_bytes"] == held_bytes(meta, tokens, hybrid=False), tokens
        assert r["hybrid_bytes"] == held_bytes(meta, tokens, hybrid=True), tokens
        assert r["hybrid_peak_bytes"] >= r["hybrid_bytes"]
    # What the hybrid cache is for: at 32k tokens a sequence holds well under a quarter.
    assert rows[512]["hybrid_bytes"] == rows[512]["full_bytes"]
    assert rows[32768]["hybrid_bytes"] / rows[32768]["full_bytes"] < 0.2


def max_context(meta: dict, pool_bytes: int, hybrid: bool) -> int:
    """The longest request the pool holds: blocks (of 3 layers with the hybrid cache, 18 without)
    for every position of the global layers and, per windowed group, at most the window plus a
    step: W - 1 + STEP positions, which touch ceil((W - 2 + STEP) / B) + 1 blocks."""
    layers = meta["layers"]
    if not hybrid:
        blocks = pool_bytes // (BLOCK * layer_row_bytes(meta) * layers)
        return blocks * BLOCK
    per_block = BLOCK * layer_row_bytes(meta) * 3
    blocks = pool_bytes // per_block
    windowed_groups = sum(meta["windowed"]) // 3
    global_groups = (layers - sum(meta["windowed"])) // 3
    window_blocks = math.ceil((meta["window"] - 2 + STEP) / BLOCK) + 1
    best = 0
    for n in range(blocks + 1):  # logical blocks of the sequence
        need = global_groups * n + windowed_groups * min(n, window_blocks)
        if need <= blocks:
            best = n
    return best * BLOCK


def test_a_pool_too_small_without_the_hybrid_cache_serves_a_long_request_with_it(meta):
    pool = 32 << 20
    words = TEXT.read_text(encoding="utf-8").split()
    prompt = " ".join(words[:2200])  # ~3000 tokens
    limits = {}
    for hybrid in (False, True):
        flags = ("--kv-cache-memory", "32MiB") + (() if hybrid else ("--no-hybrid-kv",))
        s = Server(*flags, model=GEMMA)
        try:
            limits[hybrid] = s.client.models.list().data[0].model_extra["max_model_len"]
            assert limits[hybrid] == max_context(meta, pool, hybrid)
            if hybrid:
                r = s.client.completions.create(model="m", prompt=prompt, max_tokens=4,
                                                temperature=0)
                assert r.usage.prompt_tokens > limits[False]
                assert r.usage.completion_tokens == 4
            else:
                with pytest.raises(openai.BadRequestError) as e:
                    s.client.completions.create(model="m", prompt=prompt, max_tokens=4)
                assert "maximum context length" in str(e.value)
        finally:
            assert s.stop() == 0
    assert limits[True] > 3 * limits[False]


def test_a_long_prompt_is_answered_from_the_prefix_cache_with_the_same_tokens(meta):
    s = Server("--kv-cache-memory", "64MiB", model=GEMMA)
    try:
        words = TEXT.read_text(encoding="utf-8").split()
        prompt = " ".join(words[:900])  # ~1200 tokens: past the window
        first = s.client.completions.create(model="m", prompt=prompt, max_tokens=12,
                                            temperature=0, extra_body={"ignore_eos": True})
        again = s.client.completions.create(model="m", prompt=prompt, max_tokens=12,
                                            temperature=0, extra_body={"ignore_eos": True})
        assert first.usage.prompt_tokens > 2 * meta["window"]
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        # Every whole block but the one holding the last prompt token.
        cached = again.usage.prompt_tokens_details.cached_tokens
        assert cached == (first.usage.prompt_tokens - 1) // BLOCK * BLOCK
        assert again.choices[0].text == first.choices[0].text
    finally:
        assert s.stop() == 0
