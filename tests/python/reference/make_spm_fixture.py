"""Writes tests/python/data/spm_gemma3_fixture.json: llama.cpp's token ids for a corpus of texts
under a SentencePiece ("llama") vocabulary, so that tests/python/test_tokenizer_spm.py can check
`cortexstream tokenize` against llama.cpp on machines that do not have llama.cpp built.

It calls llama.cpp's C API (libllama from bench/.cache/llama-build, the build that
bench/llama_cpp_build.py makes) through ctypes, loading only the vocabulary of the model, and
records for every text:
  ids[add_special][parse_special]  llama_tokenize with add_special/parse_special true and false
  decoded                          llama_detokenize(ids with both true, remove_special=false,
                                   unparse_special=true), invalid UTF-8 replaced by U+FFFD
plus the ids llama_vocab_is_eog accepts, the llama.cpp version and the model's SHA-256.

Run from the repo root (after `python3 bench/llama_cpp_build.py --build llama-tokenize`, which
builds libllama too):
  python3 tests/python/reference/make_spm_fixture.py [--model models/gemma-3-270m-q4_k_m.gguf]
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "bench"))
import llama_cpp_build  # noqa: E402  (bench/llama_cpp_build.py)

DEFAULT_MODEL = ROOT / "models" / "gemma-3-270m-q4_k_m.gguf"
DEFAULT_OUT = ROOT / "tests" / "python" / "data" / "spm_gemma3_fixture.json"

# ---- corpus --------------------------------------------------------------------------------------

HANDWRITTEN = [
    # empty, single characters, spaces at the ends
    "", " ", "  ", "   ", "a", "x ", " x", "  leading", "trailing  ", " both ", "▁", "▁▁x",
    " ▁ ", "a▁b",
    # English
    "Hello world", "hello world", "Hello, world!", "The quick brown fox jumps over the lazy dog.",
    "I'm sure you'll see they've done it, we'd say it's John's.", "DON'T SHOUT",
    "e.g. Mr. Smith's U.S.A. trip", "state-of-the-art (SOTA) models",
    "Supercalifragilisticexpialidocious antidisestablishmentarianism",
    # accents, scripts, RTL, CJK
    "café naïve résumé façade Ångström", "Straße Größe", "e\u0301 vs é (combining vs precomposed)",
    "日本語のテキストです。", "中文分词测试，标点符号！", "한국어 문장입니다", "Привет, мир!",
    "Γειά σου Κόσμε", "שלום עולם", "مرحبا بالعالم", "नमस्ते दुनिया", "ไทย ภาษา",
    "עברית mixed with English and العربية", "\u202eright-to-left override\u202c",
    # emoji and rare characters (byte fallback)
    "😀😃😄 emoji 👍🏽 and 👨‍👩‍👧‍👦 family", "🇫🇷🇯🇵 flags", "math: ∑ ∫ √ ≤ ≥ ≠ ∞ π",
    "\U0001f9ec\U0001fae0\U0001fa7b", "𓀀𓀁𓂀 hieroglyphs", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕓𝕠𝕝𝕕", "\U000e0041\U000e0042",
    "\U0010fffd private use", "\ue000\uf8ff", "\u0000nul\u0001soh\u007fdel", "\x1b[31mred\x1b[0m",
    "zero\u200bwidth\u200djoiner", "non\u00a0breaking\u00a0space", "ideographic\u3000space",
    "fullwidth ＡＢＣ１２３", "Ⅻ ½ ² ٣", "\ufeffbyte order mark", "ꙮ ꧁꧂ ᚠᛇᚻ",
    # digits
    "0", "12", "123", "1234567890", "3.14159265358979", "-42", "1,000,000", "2024-01-15T12:34:56Z",
    "v1.2.3", "abc123def", "0x1F600", "1e-10", "99999999999999999999999999999999999999",
    # code
    "def f(x):\n    return x * 2\n", "int main() {\n\treturn 0;\n}\n",
    "    four spaces\n        eight spaces\n", "if (a && b || !c) { x += 1; }",
    "for i in range(10):\n\tif i % 2 == 0:\n\t\tprint(i)\n",
    "<div class=\"a\">&amp;</div>", "<table><tr><td>1</td></tr></table>", "<b>bold</b> <i>it</i>",
    "SELECT * FROM t WHERE id = 42;", "#include <vector>\nstd::vector<int> v{1, 2, 3};",
    "x=>x**2 // comment /* block */", "path/to/file.txt C:\\Windows\\System32",
    # whitespace
    "tab\there", "\t\tleading tabs", "trailing tabs\t\t", "crlf\r\nline\r\n", "\r\n\r\n",
    "multiple   spaces   here", "\n", "\n\n\n\n", "a\n\nb\n\n\nc", " \n \n ",
    "mixed \t \n \r\n  end", "\x0b vertical tab \x0c form feed", "\u2028line\u2029para", "\u0085nel",
    " " * 40, "\n" * 40, "\t" * 40, "x" + " " * 33 + "y",
    # special-token text
    "<start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n",
    "<start_of_turn>user\n", "<end_of_turn>", "<bos>", "<eos>", "<pad>", "<unk>", "<mask>",
    "<bos>Hello", "Hello<eos>", "<bos><bos>", "<start_of_turn", "start_of_turn>", "<START_OF_TURN>",
    "<end_of_turn><end_of_turn>", " <end_of_turn> spaced ", "<unused0><unused99>",
    "<start_of_image>", "<end_of_image>", "[multimodal]", "<0x41>", "<0xFF>", "<0x0A>",
    "text<start_of_turn>more", "a<b>c</b>d", "<h1>Title</h1>\n\n<p>para</p>",
    # punctuation
    "!!!???...", "'''", "\"quoted\"", "--", "—–-", "«guillemets»", "¿Qué? ¡Sí!", "@user #tag $5 %",
    "~`^|\\", "a'b", "'s 't 're 've 'm 'll 'd", "'", "x'", "'x",
]

POOLS = [
    ["the", "cat", "Hello", "tokenizer", "World", "naïve", "über", "año", "piece", "sentence"],
    list("0123456789"), ["12", "345", "2024", "3.14", "1e5"],
    list(".,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`"),
    [" ", "  ", "\t", "\n", "\r\n", "   ", "\u00a0", "\u3000", "\n\n", "▁"],
    list("日本語中文한국어ひらがなカタカナ"), ["😀", "👍🏽", "🚀", "❤️", "👨‍💻", "𓀀", "\U0001fae0"],
    list("אבגדهسلام"), ["é", "e\u0301", "ñ", "ø", "ß", "Œ", "ı", "İ", "ǅ", "ﬁ"],
    ["<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<unk>", "<pad>", "<b>", "</td>",
     "[multimodal]", "<0x41>", "<unused7>", "<start_of_turn"],
    ["\u0007", "\u001f", "\u00ad", "\u200b", "\ufffd", "\U000e0001", "\U0010fffd"],
]


def random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        parts = [rng.choice(rng.choice(POOLS)) for _ in range(rng.randint(1, 24))]
        texts.append("".join(parts))
    return texts


def random_code_points(n: int, seed: int) -> list[str]:
    """Strings of random code points from all planes (no surrogates), for byte fallback."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        chars = []
        for _ in range(rng.randint(1, 12)):
            plane = rng.choice([0x80, 0x800, 0x10000, 0x110000])
            cp = rng.randrange(0x20, plane)
            if 0xD800 <= cp <= 0xDFFF:
                cp = 0xFFFD
            chars.append(chr(cp))
        out.append("".join(chars))
    return out


def corpus() -> list[str]:
    long_doc = "\n\n".join(" ".join(random_texts(60, seed=s)) for s in range(4))
    prose = (ROOT / "README.md").read_text(encoding="utf-8")[:6000]
    return HANDWRITTEN + random_texts(300, seed=4321) + random_code_points(100, seed=99) + [
        long_doc, prose]


# ---- llama.cpp through ctypes --------------------------------------------------------------------


class ModelParams(ctypes.Structure):
    # llama.h's struct llama_model_params, field for field.
    _fields_ = [
        ("devices", ctypes.c_void_p), ("tensor_buft_overrides", ctypes.c_void_p),
        ("n_gpu_layers", ctypes.c_int32), ("split_mode", ctypes.c_int),
        ("load_mode", ctypes.c_int), ("lazy_mode", ctypes.c_int), ("main_gpu", ctypes.c_int32),
        ("tensor_split", ctypes.c_void_p), ("progress_callback", ctypes.c_void_p),
        ("progress_callback_user_data", ctypes.c_void_p), ("kv_overrides", ctypes.c_void_p),
        ("vocab_only", ctypes.c_bool), ("check_tensors", ctypes.c_bool),
        ("use_extra_bufts", ctypes.c_bool), ("no_host", ctypes.c_bool),
        ("no_alloc", ctypes.c_bool), ("load_mtp", ctypes.c_bool),
    ]


class LlamaVocab:
    def __init__(self, lib_dir: Path, model: Path):
        lib = ctypes.CDLL(str(lib_dir / "libllama.so"))
        lib.llama_backend_init.restype = None
        lib.llama_model_default_params.restype = ModelParams
        lib.llama_model_load_from_file.argtypes = [ctypes.c_char_p, ModelParams]
        lib.llama_model_load_from_file.restype = ctypes.c_void_p
        lib.llama_model_get_vocab.argtypes = [ctypes.c_void_p]
        lib.llama_model_get_vocab.restype = ctypes.c_void_p
        lib.llama_vocab_n_tokens.argtypes = [ctypes.c_void_p]
        lib.llama_vocab_n_tokens.restype = ctypes.c_int32
        lib.llama_vocab_is_eog.argtypes = [ctypes.c_void_p, ctypes.c_int32]
        lib.llama_vocab_is_eog.restype = ctypes.c_bool
        lib.llama_tokenize.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int32,
                                       ctypes.POINTER(ctypes.c_int32), ctypes.c_int32,
                                       ctypes.c_bool, ctypes.c_bool]
        lib.llama_tokenize.restype = ctypes.c_int32
        lib.llama_detokenize.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int32),
                                         ctypes.c_int32, ctypes.c_char_p, ctypes.c_int32,
                                         ctypes.c_bool, ctypes.c_bool]
        lib.llama_detokenize.restype = ctypes.c_int32
        lib.llama_backend_init()
        params = lib.llama_model_default_params()
        params.vocab_only = True
        self.model = lib.llama_model_load_from_file(str(model).encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {model}")
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.lib = lib

    def n_tokens(self) -> int:
        return self.lib.llama_vocab_n_tokens(self.vocab)

    def is_eog(self, token: int) -> bool:
        return self.lib.llama_vocab_is_eog(self.vocab, token)

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        raw = text.encode("utf-8")
        cap = len(raw) + 8
        while True:
            buf = (ctypes.c_int32 * cap)()
            n = self.lib.llama_tokenize(self.vocab, raw, len(raw), buf, cap, add_special,
                                        parse_special)
            if n >= 0:
                return list(buf[:n])
            cap = -n

    def detokenize(self, ids: list[int], remove_special: bool, unparse_special: bool) -> bytes:
        arr = (ctypes.c_int32 * max(1, len(ids)))(*ids)
        cap = 64 + 32 * len(ids)
        while True:
            buf = ctypes.create_string_buffer(cap)
            n = self.lib.llama_detokenize(self.vocab, arr, len(ids), buf, cap, remove_special,
                                          unparse_special)
            if n >= 0:
                return buf.raw[:n]
            cap = -n


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--lib-dir", type=Path, default=llama_cpp_build.LLAMA_BUILD_DIR / "bin")
    args = ap.parse_args()

    vocab = LlamaVocab(args.lib_dir, args.model)
    tool = args.lib_dir / "llama-tokenize"
    cases = []
    for text in corpus():
        ids = {}
        for add in (True, False):
            for parse in (True, False):
                key = ("add" if add else "noadd") + "_" + ("parse" if parse else "noparse")
                ids[key] = vocab.tokenize(text, add, parse)
        decoded = vocab.detokenize(ids["add_parse"], False, True)
        cases.append({"text": text, "ids": ids,
                      "decoded": decoded.decode("utf-8", errors="replace")})
    n = vocab.n_tokens()
    fixture = {
        "about": "llama.cpp token ids for a SentencePiece vocabulary; made by "
                 "tests/python/reference/make_spm_fixture.py",
        "llama_cpp": {
            "llama_cpp_python": llama_cpp_build.pinned_llama_cpp_python(),
            "vendored_commit": llama_cpp_build.llama_vendor_commit(),
            "version": llama_cpp_build.llama_version(tool) if tool.exists() else None,
        },
        "model": {"file": args.model.name, "sha256": sha256(args.model), "n_tokens": n},
        "eog_ids": [i for i in range(n) if vocab.is_eog(i)],
        "cases": cases,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # note: one case per line, so that a regenerated fixture diffs line by line.
    cases_text = ",\n".join(json.dumps(c, ensure_ascii=False, separators=(",", ":"))
                            for c in fixture.pop("cases"))
    head = json.dumps(fixture, ensure_ascii=False, indent=1)[:-2]
    args.out.write_text(f"{head},\n \"cases\": [\n{cases_text}\n]}}\n", encoding="utf-8")
    print(f"{args.out}: {len(cases)} texts", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
