"""The SentencePiece ("llama") tokenizer of `cortexstream tokenize` on Gemma 3 270M against
llama.cpp: token ids and decoded text from tests/python/data/spm_gemma3_fixture.json (written by
tests/python/reference/make_spm_fixture.py, which runs llama.cpp), plus a cross-check on random
strings against an independent pure-Python implementation (tests/python/reference/spm_ref.py).

Run from the repo root:  python3 -m pytest -q tests/python/test_tokenizer_spm.py
Env: CORTEXSTREAM_BIN (default build/src/cli/cortexstream), CORTEX_GEMMA_MODEL (default
models/gemma-3-270m-q4_k_m.gguf; scripts/fetch_model.sh gemma3-270m fetches it).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent.parent
BIN = Path(os.environ.get("CORTEXSTREAM_BIN", REPO / "build" / "src" / "cli" / "cortexstream"))
MODEL = Path(os.environ.get("CORTEX_GEMMA_MODEL", REPO / "models" / "gemma-3-270m-q4_k_m.gguf"))
FIXTURE = REPO / "tests" / "python" / "data" / "spm_gemma3_fixture.json"
BOS = "<bos>"


@pytest.fixture(scope="module")
def fixture() -> dict:
    data = json.loads(FIXTURE.read_text(encoding="utf-8"))
    assert data["llama_cpp"]["vendored_commit"] and data["model"]["sha256"]
    return data


@pytest.fixture(scope="module")
def binary(fixture) -> str:
    if not BIN.exists():
        pytest.skip(f"cortexstream binary not found: {BIN} (build it or set CORTEXSTREAM_BIN)")
    if not MODEL.exists():
        pytest.skip(f"model not found: {MODEL} (scripts/fetch_model.sh gemma3-270m)")
    h = hashlib.sha256()
    with MODEL.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    assert h.hexdigest() == fixture["model"]["sha256"], \
        f"{MODEL} is not the model the fixture was made from"
    return str(BIN)


def run_lines(binary: str, texts: list[str], *extra: str) -> list[dict]:
    stdin = "".join(json.dumps(t) + "\n" for t in texts)
    proc = subprocess.run([binary, "tokenize", "--model", str(MODEL), "--lines-json", *extra],
                          input=stdin.encode(), capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    # note: split on "\n" only; str.splitlines() would also split inside U+2028 and U+0085.
    lines = proc.stdout.decode().split("\n")[:-1]
    assert len(lines) == len(texts)
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def parsed(binary, fixture) -> list[dict]:
    return run_lines(binary, [c["text"] for c in fixture["cases"]])


@pytest.fixture(scope="module")
def unparsed(binary, fixture) -> list[dict]:
    return run_lines(binary, [c["text"] for c in fixture["cases"]], "--no-special")


def first_mismatch(fixture, ours, key):
    bad = [(c["text"], o["ids"], c["ids"][key]) for c, o in zip(fixture["cases"], ours)
           if o["ids"] != c["ids"][key]]
    return f"{len(bad)}/{len(ours)} texts differ; first: {bad[0]!r}" if bad else None


def test_ids_match_llama_cpp_parsing_special(fixture, parsed):
    assert len(fixture["cases"]) > 500
    assert (msg := first_mismatch(fixture, parsed, "add_parse")) is None, msg


def test_ids_match_llama_cpp_not_parsing_special(fixture, unparsed):
    assert (msg := first_mismatch(fixture, unparsed, "add_noparse")) is None, msg


def test_ids_match_llama_cpp_without_add_special(binary, fixture):
    texts = [c["text"] for c in fixture["cases"]]
    for flags, key in ((("--no-bos",), "noadd_parse"), (("--no-bos", "--no-special"), "noadd_noparse")):
        ours = run_lines(binary, texts, *flags)
        assert (msg := first_mismatch(fixture, ours, key)) is None, (flags, msg)


def test_decoded_text_matches_llama_cpp(fixture, parsed):
    bad = [(c["text"], o["decoded"], c["decoded"]) for c, o in zip(fixture["cases"], parsed)
           if o["decoded"] != c["decoded"]]
    assert not bad, f"{len(bad)} differ; first: {bad[0]!r}"


def test_decode_round_trips(fixture, parsed, unparsed):
    # No space prefix: decoding gives back the text after the rendered BOS, except that a
    # U+2581 written in the text comes back as the space it stands for.
    for case, a, b in zip(fixture["cases"], parsed, unparsed):
        want = BOS + case["text"].replace("\u2581", " ")
        assert a["decoded"] == want
        assert b["decoded"] == want


def test_special_tokens_and_byte_fallback(fixture, parsed, unparsed):
    by_text = {c["text"]: (a["ids"], b["ids"]) for c, a, b in
               zip(fixture["cases"], parsed, unparsed)}
    # Control tokens are cut out only when parsing specials.
    assert by_text["<start_of_turn>user\n"][0] == [2, 105, 2364, 107]
    assert by_text["<end_of_turn>"][0] == [2, 106]
    assert 106 not in by_text["<end_of_turn>"][1] and len(by_text["<end_of_turn>"][1]) > 2
    # User-defined tokens (runs of spaces and newlines, HTML tags) are cut out either way.
    for text, ident in (("  ", 138), ("\n", 107), ("\n" * 40, 137), ("<b>bold</b> <i>it</i>", 200)):
        assert by_text[text][0][1] == ident and by_text[text][1][1] == ident
    # Characters without a token of their own fall back to their bytes' <0xXX> tokens (238 + b).
    text = "\U000e0041\U000e0042"  # tag characters
    assert by_text[text][0][1:] == [238 + b for b in text.encode()]
    assert by_text["\U0001f9ec\U0001fae0\U0001fa7b"][0][3:] == [238 + b for b in "\U0001fa7b".encode()]
    assert by_text[""] == ([2], [2])


def test_end_of_generation_ids(fixture):
    # <eos>, <end_of_turn> and "</s>" (a user-defined token llama.cpp treats as end of generation).
    assert fixture["eog_ids"] == [1, 106, 212]


def test_matches_independent_python_implementation(binary):
    sys.path.insert(0, str(REPO / "tests" / "python"))
    from reference.spm_ref import SpmVocab

    vocab = SpmVocab(str(MODEL))
    rng = random.Random(20240601)
    pool = ["the", " quick", "brown", " ", "  ", "\n", "\t", "é", "e\u0301", "日本", "語", "😀",
            "👍🏽", "\U0001fae0", "<start_of_turn>", "<end_of_turn>", "<bos>", "</s>", "<b>",
            "123", "4", "ü", "ß", "▁", "<", ">", "/", "a", "ab", "'s", "\u00a0", "\u3000",
            "\U000e0041", "x" * 5, "Œ", "ǅ"]
    texts = []
    for _ in range(150):
        parts = [rng.choice(pool) for _ in range(rng.randint(1, 12))]
        if rng.random() < 0.3:
            parts.append(chr(rng.randrange(0x80, 0x2FFFF)))
        texts.append("".join(parts).replace("\ud800", ""))
    texts = [t for t in texts if not any(0xD800 <= ord(c) <= 0xDFFF for c in t)]
    for extra, parse in (((), True), (("--no-special",), False)):
        ours = run_lines(binary, texts, *extra)
        bad = [(t, o["ids"], vocab.encode(t, True, parse)) for t, o in zip(texts, ours)
               if o["ids"] != vocab.encode(t, True, parse)]
        assert not bad, f"parse_special={parse}: {len(bad)} differ; first: {bad[0]!r}"


def test_long_text_is_fast(binary):
    # A whole-file-sized text tokenizes in well under a second (perplexity tokenizes files). It
    # goes in one command-line argument, which Linux caps at 128 KiB: 120,000 bytes of it.
    text = ((REPO / "README.md").read_text(encoding="utf-8") * 20).encode()[:120_000]
    text = text.decode("utf-8", "ignore")
    proc = subprocess.run([binary, "tokenize", "--model", str(MODEL), text],
                          capture_output=True, timeout=60, text=True)
    assert proc.returncode == 0, proc.stderr
    ids = json.loads(proc.stdout)
    assert ids[0] == 2 and len(ids) > len(text) // 8
