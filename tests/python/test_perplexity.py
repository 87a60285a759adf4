"""`cortexstream perplexity`, both methods, and windowed scoring (--kv-window, --kv-sinks).

On the default model, the independent check is a text made of one sentence S repeated, whose tokens are exactly S's
tokens repeated (checked), with --ctx = the tokens of S. Then every window of either method is S
itself, so both figures follow from S's logits alone: `generate --dump-logits` gives the float32
logits of every position of S, and NumPy turns them into log-probabilities in float64. That path
shares the forward pass with `perplexity` (the forward pass has its own reference tests) but none
of the windowing, the engine's prompt log-probs or the averaging.

The default model's vocabulary does not add BOS, so the BOS handling (once at the start for
`native`, the first token of every chunk for `llama.cpp`) is checked on a tiny random model whose
vocabulary does, against the float64 NumPy reference model (tests/python/reference) on the token
ids each method should score.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from reference.llama_ref import LlamaRef  # noqa: E402
from reference.tiny_model import write_tiny_model  # noqa: E402

REPO = HERE.parent.parent
BIN = Path(os.environ.get("CORTEXSTREAM_BIN", REPO / "build" / "src" / "cli" / "cortexstream"))
DEFAULT_MODEL = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"

SENTENCE = ("The river rises in the mountains, runs through forests and farmland, and reaches "
            "the sea after many miles. Towns grew on its banks because the water carried boats, "
            "turned mills and fed the fields.\n")
REPEATS = 5


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=300)


def run_json(*args: str) -> dict:
    proc = run(*args)
    assert proc.returncode == 0, f"{args}: {proc.stderr}"
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, "prints one JSON line"
    return json.loads(lines[0])


def tokenize(text: str, model: Path = DEFAULT_MODEL) -> list[int]:
    proc = run("tokenize", "--model", str(model), "--no-special", text)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def perplexity(path: Path, ctx: int, method: str, *extra: str) -> dict:
    return run_json("perplexity", "--model", str(DEFAULT_MODEL), "--file", str(path), "--ctx",
                    str(ctx), "--method", method, *extra)


@pytest.fixture(scope="module", autouse=True)
def need_binary_and_model():
    if not BIN.exists():
        pytest.fail(f"{BIN} not built (scripts/build.sh)")
    if not DEFAULT_MODEL.exists():
        pytest.fail(f"{DEFAULT_MODEL} missing: run scripts/fetch_model.sh")


@pytest.fixture(scope="module")
def repeated(tmp_path_factory) -> tuple[Path, int]:
    """The repeated-sentence file and its --ctx (the sentence's token count)."""
    ids = tokenize(SENTENCE)
    assert tokenize(SENTENCE * REPEATS) == ids * REPEATS, \
        "the sentence must tokenize the same alone and repeated (and without BOS)"
    path = tmp_path_factory.mktemp("ppl") / "repeated.txt"
    path.write_text(SENTENCE * REPEATS)
    return path, len(ids)


@pytest.fixture(scope="module")
def sentence_logprobs(repeated, tmp_path_factory) -> np.ndarray:
    """log p(token i | tokens before it) for i = 1 .. ctx - 1 of the sentence, in float64."""
    _, ctx = repeated
    out = tmp_path_factory.mktemp("logits") / "logits.npy"
    run_json("generate", "--model", str(DEFAULT_MODEL), "--prompt", SENTENCE, "--max-tokens", "1",
             "--temperature", "0", "--json", "--dump-logits", str(out))
    # One row per prompt position, then one per generated token (here 1).
    logits = np.load(out).astype(np.float64)
    assert logits.shape[0] == ctx + 1
    logits = logits[:ctx]
    ids = np.array(tokenize(SENTENCE))
    m = logits.max(axis=1, keepdims=True)
    logz = (m + np.log(np.exp(logits - m).sum(axis=1, keepdims=True)))[:, 0]
    # Row i predicts token i + 1.
    return logits[np.arange(ctx - 1), ids[1:]] - logz[:-1]


# Both sides run the same kernels on the same tokens with the same KV storage (f16), so the
# logits agree; what is left is the engine rounding each log-prob to float32 (~1e-7 relative)
# before summing. 1e-5 leaves room for that and nothing else.
REL_TOL = 1e-5


def test_native_fields_and_figure(repeated, sentence_logprobs):
    path, ctx = repeated
    out = perplexity(path, ctx, "native")
    assert set(out) == {"perplexity", "tokens", "windows", "ctx", "method", "seconds"}
    assert out["method"] == "native" and out["ctx"] == ctx and out["seconds"] > 0
    assert out["windows"] == REPEATS
    assert out["tokens"] == REPEATS * (ctx - 1)
    expected = float(np.exp(-sentence_logprobs.mean()))
    assert abs(out["perplexity"] - expected) / expected < REL_TOL, (out, expected)


def test_llama_cpp_fields_and_figure(repeated, sentence_logprobs):
    path, ctx = repeated
    out = perplexity(path, ctx, "llama.cpp")
    assert set(out) == {"perplexity", "tokens", "windows", "ctx", "method", "seconds"}
    assert out["method"] == "llama.cpp" and out["ctx"] == ctx
    assert out["windows"] == REPEATS  # whole chunks of ctx tokens
    first = ctx // 2
    assert out["tokens"] == REPEATS * (ctx - first - 1)
    # Scored: tokens first + 1 .. ctx - 1 of each chunk (entries first .. ctx - 2 here).
    expected = float(np.exp(-sentence_logprobs[first:].mean()))
    assert abs(out["perplexity"] - expected) / expected < REL_TOL, (out, expected)


def test_windowed_scoring(repeated):
    # A window that skips nothing is full attention, bit for bit (a query that skips no key is
    # computed exactly as without a window).
    path, ctx = repeated
    plain = perplexity(path, ctx, "native")
    wide = perplexity(path, ctx, "native", "--kv-window", str(ctx), "--kv-sinks", "4")
    assert wide["perplexity"] == plain["perplexity"], (wide, plain)
    assert wide["kv_window"] == ctx and wide["kv_sinks"] == 4
    # The whole text as one window: with full attention every repeat is copied from the one
    # before; an 8-token window (with or without sinks) cannot see it, so it predicts worse.
    whole = REPEATS * ctx
    full = perplexity(path, whole, "native")
    narrow = perplexity(path, whole, "native", "--kv-window", "8", "--kv-sinks", "4")
    assert narrow["tokens"] == full["tokens"] == whole - 1
    assert narrow["perplexity"] > 2 * full["perplexity"], (narrow, full)
    proc = run("perplexity", "--model", str(DEFAULT_MODEL), "--file", str(path), "--kv-sinks", "4")
    assert proc.returncode != 0 and "--kv-sinks needs --kv-window" in proc.stderr


def test_counts_when_the_text_does_not_divide(tmp_path):
    text = SENTENCE * 3 + "A last, shorter line about the sea.\n"
    path = tmp_path / "text.txt"
    path.write_text(text)
    n = len(tokenize(text))
    ctx = 40
    native = perplexity(path, ctx, "native")
    starts = range(0, n - 1, ctx)
    assert native["windows"] == len(starts)
    assert native["tokens"] == sum(min(ctx, n - s) - 1 for s in starts)
    llama = perplexity(path, ctx, "llama.cpp")
    assert llama["windows"] == n // ctx  # the remainder is not scored
    assert llama["tokens"] == (n // ctx) * (ctx - ctx // 2 - 1)


def test_llama_cpp_refuses_fewer_than_two_chunks(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text(SENTENCE)
    proc = run("perplexity", "--model", str(DEFAULT_MODEL), "--file", str(path), "--ctx", "64",
               "--method", "llama.cpp")
    assert proc.returncode == 1
    assert "2 x --ctx" in proc.stderr


def test_bad_method_is_a_usage_error(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(SENTENCE)
    proc = run("perplexity", "--file", str(path), "--method", "strided")
    assert proc.returncode not in (0, 1), proc.returncode  # a usage error, not a failed run
    assert "method" in proc.stderr


def ref_logprobs(ref: LlamaRef, ids: list[int]) -> np.ndarray:
    """log p(ids[i] | ids[:i]) for i = 1 .. len(ids) - 1, from the float64 reference."""
    logits = ref.logits(ids)
    m = logits.max(axis=1, keepdims=True)
    logz = (m + np.log(np.exp(logits - m).sum(axis=1, keepdims=True)))[:, 0]
    return logits[np.arange(len(ids) - 1), ids[1:]] - logz[:-1]


def test_bos_handling_against_the_reference(tmp_path, monkeypatch):
    # A tiny model like the forward-pass tests use, but with tokenizer.ggml.add_bos_token = true.
    write_bos = gguf.GGUFWriter.add_add_bos_token
    monkeypatch.setattr(gguf.GGUFWriter, "add_add_bos_token", lambda w, _: write_bos(w, True))
    model = tmp_path / "tiny-bos.gguf"
    info = write_tiny_model(str(model), seed=5)
    ref = LlamaRef(str(model))
    bos = info["bos_id"]
    text = ("The quick brown fox jumps over the lazy dog; a wizard's job is to vex chumps "
            "quickly in fog. ") * 4
    path = tmp_path / "text.txt"
    path.write_text(text)
    ids = tokenize(text, model)
    assert ids[0] == bos and bos not in ids[1:], "BOS once, at the start"
    ctx = 40
    n = len(ids)
    assert n >= 3 * ctx

    def cli(method: str) -> dict:
        # f32 KV: the C++ logits then match the reference to ~1e-6 relative (the forward-pass
        # tests' measurement), so 1e-4 on the perplexity leaves room and catches any wrong token.
        return run_json("perplexity", "--model", str(model), "--file", str(path), "--ctx",
                        str(ctx), "--method", method, "--kv-dtype", "f32")

    nll, count = 0.0, 0
    for start in range(0, n - 1, ctx):
        lp = ref_logprobs(ref, ids[start:start + ctx])
        nll -= lp.sum()
        count += len(lp)
    native = cli("native")
    assert native["tokens"] == count
    expected = float(np.exp(nll / count))
    assert abs(native["perplexity"] - expected) / expected < 1e-4, (native, expected)

    nll, count = 0.0, 0
    for c in range(n // ctx):
        chunk = [bos] + ids[c * ctx + 1:(c + 1) * ctx]  # every chunk starts with BOS
        lp = ref_logprobs(ref, chunk)[ctx // 2:]        # tokens ctx/2 + 1 .. ctx - 1
        nll -= lp.sum()
        count += len(lp)
    llama = cli("llama.cpp")
    assert llama["windows"] == n // ctx and llama["tokens"] == count
    expected = float(np.exp(nll / count))
    assert abs(llama["perplexity"] - expected) / expected < 1e-4, (llama, expected)
