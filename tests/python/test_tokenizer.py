"""The C++ tokenizer (`cortexstream tokenize`) against an independent reference: a HuggingFace
`tokenizers` BPE built from the same GGUF vocabulary and merges, with SmolLM2's own HF
pre-tokenizer (Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False)]) and
its control tokens as special added tokens.

Run from the repo root:  python3 -m pytest -q tests/python/test_tokenizer.py
Env: CORTEXSTREAM_BIN (default build/src/cli/cortexstream), CORTEX_TEST_MODEL (default model).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")

REPO = Path(__file__).resolve().parent.parent.parent
BIN = Path(os.environ.get("CORTEXSTREAM_BIN", REPO / "build" / "src" / "cli" / "cortexstream"))
MODEL = Path(os.environ.get("CORTEX_TEST_MODEL", REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<file_sep>",
            "<jupyter_code>", "<empty_output>"]

HANDWRITTEN = [
    # English
    "Hello world", "hello world", "Hello, world!", "The quick brown fox jumps over the lazy dog.",
    "I'm sure you'll see they've done it, we'd say it's John's.", "DON'T SHOUT'S",
    "a", " ", "  ", "x ", " x", "e.g. Mr. Smith's U.S.A. trip", "state-of-the-art (SOTA) models",
    # Unicode
    "café naïve résumé façade Ångström", "Straße Größe", "e\u0301 vs é (combining vs precomposed)",
    "日本語のテキストです。", "中文分词测试，标点符号！", "한국어 문장입니다", "Привет, мир!",
    "Γειά σου Κόσμε", "שלום עולם", "مرحبا بالعالم", "नमस्ते दुनिया", "ไทย ภาษา",
    "😀😃😄 emoji 👍🏽 and 👨‍👩‍👧‍👦 family", "🇫🇷🇯🇵 flags", "math: ∑ ∫ √ ≤ ≥ ≠ ∞ π",
    "zero\u200bwidth\u200djoiner", "non\u00a0breaking\u00a0space", "ideographic\u3000space",
    "fullwidth ＡＢＣ１２３", "Ⅻ Roman numeral, ½ fraction, ² superscript, ٣ Arabic-Indic digit",
    # digits
    "0", "12", "123", "1234567890", "3.14159265358979", "-42", "1,000,000", "2024-01-15T12:34:56Z",
    "v1.2.3", "abc123def", "0x1F600", "1e-10", "phone: +1 (555) 123-4567",
    "99999999999999999999999999999999999999",
    # code
    "def f(x):\n    return x * 2\n", "int main() {\n\treturn 0;\n}\n",
    "    four spaces\n        eight spaces\n", "if (a && b || !c) { x += 1; }",
    "for i in range(10):\n\tif i % 2 == 0:\n\t\tprint(i)\n", "<div class=\"a\">&amp;</div>",
    "SELECT * FROM t WHERE id = 42;", "#include <vector>\nstd::vector<int> v{1, 2, 3};",
    "x=>x**2 // comment /* block */", "path/to/file.txt C:\\Windows\\System32",
    # whitespace
    "tab\there", "\t\tleading tabs", "trailing tabs\t\t", "crlf\r\nline\r\n", "\r\n\r\n",
    "multiple   spaces   here", "trailing spaces   ", "   leading spaces", "\n", "\n\n\n\n",
    "a\n\nb\n\n\nc", " \n \n ", "mixed \t \n \r\n  end", "\x0b vertical tab \x0c form feed",
    "\u2028line separator\u2029paragraph separator", "\u0085next line",
    # special tokens in text
    "<|im_start|>user\nHello world<|im_end|>",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more", "<|im_end|><|im_end|>", "<|im_start|", "<im_start>",
    "<|im_start|><|im_start|>x", "<file_sep><repo_name>name<filename>f.py",
    " <|im_start|> spaced ", "<|IM_START|> wrong case",
    # misc punctuation
    "!!!???...", "'''", "\"quoted\"", "--", "—–-", "«guillemets»", "¿Qué? ¡Sí!", "@user #tag $5 %",
    "~`^|\\", "a'b", "'s 't 're 've 'm 'll 'd", "it's", "'", "x'", "'x",
]


def _random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    pools = [
        ["the", "cat", "Hello", "tokenizer", "World", "naïve", "über", "año"],
        list("0123456789"), ["12", "345", "2024", "3.14", "1e5"],
        list(".,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`"),
        [" ", "  ", "\t", "\n", "\r\n", "   ", "\u00a0", "\u3000", "\n\n"],
        list("日本語中文한국어ひらがなカタカナ"), ["😀", "👍🏽", "🚀", "❤️", "👨‍💻"],
        list("אבגדهسلام"), ["é", "e\u0301", "ñ", "ø", "ß", "Œ", "ı", "İ"],
        SPECIALS, ["'s", "'ll", "'ve", "n't", "'d"],
    ]
    texts = []
    for _ in range(n):
        parts = [rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 24))]
        texts.append("".join(parts))
    return texts


TEXTS = HANDWRITTEN + _random_texts(400, seed=1234) + [
    # A long document: many paragraphs, to catch anything length-dependent.
    "\n\n".join(" ".join(_random_texts(60, seed=s)) for s in range(5)),
]


def _strings(field) -> list[str]:
    # note: reading the raw parts is much faster than field.contents() for 49k strings.
    return [bytes(field.parts[i]).decode("utf-8") for i in field.data]


@pytest.fixture(scope="module")
def vocab():
    if not MODEL.exists():
        pytest.skip(f"model not found: {MODEL} (run scripts/fetch_model.sh)")
    r = gguf.GGUFReader(str(MODEL))
    tokens = _strings(r.fields["tokenizer.ggml.tokens"])
    merges = _strings(r.fields["tokenizer.ggml.merges"])
    types = [int(x) for x in r.fields["tokenizer.ggml.token_type"].contents()]
    assert bytes(r.fields["tokenizer.ggml.pre"].parts[-1]).decode() == "smollm"
    return tokens, merges, types


def _reference(vocab, with_specials: bool):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens, merges, types = vocab
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                     merges=[tuple(m.split(" ", 1)) for m in merges])
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    if with_specials:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types) if ty == 3])
    return tok


@pytest.fixture(scope="module")
def reference(vocab):
    return _reference(vocab, with_specials=True)


@pytest.fixture(scope="module")
def reference_plain(vocab):
    return _reference(vocab, with_specials=False)


def _binary():
    if not BIN.exists():
        pytest.skip(f"cortexstream binary not found: {BIN} (build it or set CORTEXSTREAM_BIN)")
    if not MODEL.exists():
        pytest.skip(f"model not found: {MODEL}")
    return str(BIN)


def _ours(texts: list[str], *extra: str) -> list[dict]:
    stdin = "".join(json.dumps(t) + "\n" for t in texts)
    proc = subprocess.run([_binary(), "tokenize", "--model", str(MODEL), "--lines-json", *extra],
                          input=stdin.encode(), capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    # note: split on "\n" only; str.splitlines() would also split inside U+2028 and U+0085.
    lines = proc.stdout.decode().split("\n")[:-1]
    assert len(lines) == len(texts)
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def ours():
    return _ours(TEXTS)


@pytest.fixture(scope="module")
def ours_no_special():
    return _ours(TEXTS, "--no-special")


def test_ids_match_reference(ours, reference):
    mismatches = []
    for text, got in zip(TEXTS, ours):
        want = reference.encode(text, add_special_tokens=False).ids
        if got["ids"] != want:
            mismatches.append((text, got["ids"], want))
    assert not mismatches, f"{len(mismatches)}/{len(TEXTS)} texts differ; first: {mismatches[0]!r}"
    print(f"compared {len(TEXTS)} texts with special-token parsing")


def test_ids_match_reference_without_special_parsing(ours_no_special, reference_plain):
    mismatches = [(t, g["ids"], reference_plain.encode(t).ids) for t, g in zip(TEXTS, ours_no_special)
                  if g["ids"] != reference_plain.encode(t).ids]
    assert not mismatches, f"{len(mismatches)}/{len(TEXTS)} texts differ; first: {mismatches[0]!r}"


def test_decode_round_trips(ours, ours_no_special, reference):
    for text, a, b in zip(TEXTS, ours, ours_no_special):
        assert a["decoded"] == text
        assert b["decoded"] == text
        assert reference.decode(a["ids"], skip_special_tokens=False) == text


def test_cli_prints_json_array(reference):
    text = "<|im_start|>user\nHow many r's in 'strawberry'? 12345<|im_end|>"
    out = subprocess.run([_binary(), "tokenize", "--model", str(MODEL), text],
                         capture_output=True, check=True, text=True).stdout
    assert json.loads(out) == reference.encode(text).ids
    out = subprocess.run([_binary(), "tokenize", "--model", str(MODEL), "--no-special", text],
                         capture_output=True, check=True, text=True).stdout
    assert 1 not in json.loads(out) and 2 not in json.loads(out)


def test_cli_missing_model_is_a_clear_error(tmp_path):
    proc = subprocess.run([_binary(), "tokenize", "--model", str(tmp_path / "none.gguf"), "x"],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert "none.gguf" in proc.stderr
