"""Write tiny random Llama GGUF files for tests (own NumPy quantizers, gguf.GGUFWriter for the container).

Default shape: 2 layers, hidden 64, 4 heads, 2 kv heads (head dim 16), ffn 128, vocab 300,
context 256. The file carries all metadata llama.cpp needs for architecture ``llama`` and a
minimal GPT-2 style byte-level BPE tokenizer:

  id 0 ``<|endoftext|>``, 1 ``<|im_start|>``, 2 ``<|im_end|>``  (CONTROL; bos = 1, eos = 2, as SmolLM2)
  id 3 + b    the GPT-2 byte-level character of byte b (b = 0..255, in byte order, NORMAL)
  id 259 ...  merge results, in merge order (a few meaningful ones such as "Ġt"+"he", then fillers)

Weight types: ``weight_type`` for the 2-D attention/FFN matrices, ``embd_type`` for token_embd,
``output_type`` for output.weight (absent when ``tied=True``); each one of F32, F16, BF16, Q8_0,
Q4_0, Q4_1. Norm weights are always F32 (as in llama.cpp conversions).

Quantizers follow ggml's reference quantize_row_*_ref (float32 arithmetic):
  Q8_0: d = amax/127, q = round_half_away(x/d)
  Q4_0: d = (signed value of max |x|)/-8, q = min(15, trunc(x/d + 8.5))
  Q4_1: d = (max-min)/15, m = min, q = min(15, trunc((x-m)/d + 0.5))

CLI (from tests/python):  python3 -m reference.tiny_model OUT.gguf [--seed 0] [--weight-type Q4_1] [--tied]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np
import gguf

from .llama_ref import BLOCK_INFO

QTYPES = {
    "F32": gguf.GGMLQuantizationType.F32,
    "F16": gguf.GGMLQuantizationType.F16,
    "BF16": gguf.GGMLQuantizationType.BF16,
    "Q8_0": gguf.GGMLQuantizationType.Q8_0,
    "Q4_0": gguf.GGMLQuantizationType.Q4_0,
    "Q4_1": gguf.GGMLQuantizationType.Q4_1,
}

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BOS_ID = 1
EOS_ID = 2
BYTE_TOKEN_BASE = len(SPECIAL_TOKENS)

# merges applied in this order (rank); each part must already be a token when it is added
FIXED_MERGES = [
    ("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r"), ("a", "n"), ("Ġ", "a"),
    ("o", "n"), ("r", "e"), ("Ġ", "s"), ("Ġ", "c"), ("Ġ", "o"), ("Ġ", "i"), ("Ġi", "s"),
    ("Ġ", "w"), ("a", "t"), ("e", "n"), ("o", "u"), ("l", "l"), ("H", "e"), ("He", "ll"),
    ("Hell", "o"), ("o", "r"), ("Ġ", "W"), ("ĠW", "or"), ("l", "d"), ("ĠWor", "ld"),
]


# ----------------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------------

def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable unicode character map (space -> 'Ġ', newline -> 'Ċ', ...)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def make_vocab(n_vocab: int) -> tuple[list[str], list[int], list[str]]:
    """Return (tokens, token_types, merges) of exactly n_vocab tokens."""
    b2u = bytes_to_unicode()
    tokens = list(SPECIAL_TOKENS) + [b2u[b] for b in range(256)]
    types = [int(gguf.TokenType.CONTROL)] * len(SPECIAL_TOKENS) + [int(gguf.TokenType.NORMAL)] * 256
    if n_vocab < len(tokens):
        raise ValueError(f"n_vocab must be >= {len(tokens)}")
    have = set(tokens)
    merges: list[str] = []

    def add(a: str, b: str) -> None:
        assert a in have and b in have, (a, b)
        tokens.append(a + b)
        types.append(int(gguf.TokenType.NORMAL))
        have.add(a + b)
        merges.append(f"{a} {b}")

    for a, b in FIXED_MERGES:
        if len(tokens) >= n_vocab:
            break
        add(a, b)
    letters = "abcdefghijklmnopqrstuvwxyz"
    for a in letters:
        for b in letters:
            if len(tokens) >= n_vocab:
                break
            if a + b not in have:
                add(a, b)
    if len(tokens) < n_vocab:
        raise ValueError("n_vocab too large for the filler merges")
    return tokens, types, merges


# ----------------------------------------------------------------------------------------------
# quantizers (byte layouts as documented in reference.llama_ref)
# ----------------------------------------------------------------------------------------------

def _fp16_bytes(v: np.ndarray) -> np.ndarray:
    return v.astype("<f2").view(np.uint8).reshape(-1, 2)


def quantize(w: np.ndarray, type_name: str) -> np.ndarray:
    """Quantize a (n_out, n_in) float matrix into the raw bytes of ``type_name``.

    Returns float32/float16 arrays for F32/F16, and (n_out, row_bytes) uint8 for the others."""
    w = np.asarray(w, dtype=np.float32)
    if type_name == "F32":
        return w.copy()
    if type_name == "F16":
        return w.astype(np.float16)
    n_out, n_in = w.shape
    if type_name == "BF16":
        u = w.view(np.uint32).astype(np.uint64)
        # round to nearest even on the dropped 16 bits (as ggml's fp32->bf16; no NaNs here)
        u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        return u.astype("<u2").view(np.uint8).reshape(n_out, n_in * 2)
    blk, bsz = BLOCK_INFO[int(QTYPES[type_name])]
    if n_in % blk:
        raise ValueError(f"row length {n_in} is not a multiple of {blk}")
    x = w.reshape(-1, blk)                          # one block per row
    nb = x.shape[0]
    out = np.zeros((nb, bsz), dtype=np.uint8)
    if type_name == "Q8_0":
        amax = np.max(np.abs(x), axis=1)
        d = amax / np.float32(127)
        idv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, 1), 0).astype(np.float32)
        v = x * idv[:, None]
        q = (np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))).astype(np.int8)   # roundf
        out[:, 0:2] = _fp16_bytes(d)
        out[:, 2:34] = q.view(np.uint8)
    elif type_name == "Q4_0":
        i = np.argmax(np.abs(x), axis=1)
        mx = x[np.arange(nb), i]
        d = (mx / np.float32(-8)).astype(np.float32)
        idv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, 1), 0).astype(np.float32)
        q = np.minimum(15, np.trunc(x * idv[:, None] + np.float32(8.5))).astype(np.uint8)
        out[:, 0:2] = _fp16_bytes(d)
        out[:, 2:18] = q[:, :16] | (q[:, 16:] << 4)
    elif type_name == "Q4_1":
        mn = np.min(x, axis=1)
        mx = np.max(x, axis=1)
        d = ((mx - mn) / np.float32(15)).astype(np.float32)
        idv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, 1), 0).astype(np.float32)
        q = np.minimum(15, np.trunc((x - mn[:, None]) * idv[:, None] + np.float32(0.5))).astype(np.uint8)
        out[:, 0:2] = _fp16_bytes(d)
        out[:, 2:4] = _fp16_bytes(mn)
        out[:, 4:20] = q[:, :16] | (q[:, 16:] << 4)
    else:
        raise ValueError(f"unsupported type {type_name}")
    return out.reshape(n_out, (n_in // blk) * bsz)


def _add_matrix(writer: gguf.GGUFWriter, name: str, w: np.ndarray, type_name: str) -> None:
    data = quantize(w, type_name)
    if type_name in ("F32", "F16"):
        writer.add_tensor(name, data)
    else:  # raw bytes, (n_out, row_bytes): the writer converts the byte shape to (n_out, n_in)
        writer.add_tensor(name, data, raw_dtype=QTYPES[type_name])


# ----------------------------------------------------------------------------------------------
# writer
# ----------------------------------------------------------------------------------------------

def add_tiny_vocab(w: gguf.GGUFWriter, n_vocab: int, tokens: list[str], types: list[int],
                   merges: list[str]) -> None:
    """The tokenizer metadata of a tiny model (GPT-2 style BPE, SmolLM2's special ids and ChatML
    template), shared by every tiny model writer."""
    w.add_vocab_size(n_vocab)
    w.add_quantization_version(2)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML_TEMPLATE)


def write_tiny_model(path: str, seed: int = 0, *, n_layer: int = 2, n_embd: int = 64, n_head: int = 4,
                     n_head_kv: int = 2, n_ff: int = 128, n_vocab: int = 300, n_ctx: int = 256,
                     rope_freq_base: float = 10000.0, rms_eps: float = 1e-5,
                     weight_type: str = "F32", embd_type: str | None = None,
                     output_type: str | None = None, tied: bool = False,
                     extra_tokens: int = 0) -> dict[str, Any]:
    """Write a tiny random Llama GGUF to ``path``; returns a dict describing it.

    ``extra_tokens`` > 0 makes a broken file on purpose: that many control tokens in the vocabulary
    beyond the model's ``n_vocab`` output rows."""
    embd_type = embd_type or weight_type
    output_type = output_type or weight_type
    for t in (weight_type, embd_type, output_type):
        if t not in QTYPES:
            raise ValueError(f"unknown type {t}; choose from {sorted(QTYPES)}")
    if n_embd % n_head or n_head % n_head_kv:
        raise ValueError("n_embd must divide by n_head, n_head by n_head_kv")
    head_dim = n_embd // n_head
    rng = np.random.default_rng(seed)

    def mat(n_out: int, n_in: int, scale: float = 1.0) -> np.ndarray:
        return (rng.standard_normal((n_out, n_in)) * (scale / np.sqrt(n_in))).astype(np.float32)

    def normw(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    tokens, types, merges = make_vocab(n_vocab)
    tokens = tokens + [f"<extra_{i}>" for i in range(extra_tokens)]
    types = types + [int(gguf.TokenType.CONTROL)] * extra_tokens

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(f"tiny-llama-seed{seed}")
    w.add_block_count(n_layer)
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_freq_base(float(rope_freq_base))
    w.add_layer_norm_rms_eps(float(rms_eps))
    w.add_rope_dimension_count(head_dim)
    add_tiny_vocab(w, n_vocab, tokens, types, merges)

    # token_embd rows: scale so that the tied logits have std ~2
    _add_matrix(w, "token_embd.weight", mat(n_vocab, n_embd, 2.0), embd_type)
    for i in range(n_layer):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", normw(n_embd))
        _add_matrix(w, p + "attn_q.weight", mat(n_head * head_dim, n_embd, 2.0), weight_type)
        _add_matrix(w, p + "attn_k.weight", mat(n_head_kv * head_dim, n_embd, 2.0), weight_type)
        _add_matrix(w, p + "attn_v.weight", mat(n_head_kv * head_dim, n_embd), weight_type)
        _add_matrix(w, p + "attn_output.weight", mat(n_embd, n_head * head_dim), weight_type)
        w.add_tensor(p + "ffn_norm.weight", normw(n_embd))
        _add_matrix(w, p + "ffn_gate.weight", mat(n_ff, n_embd), weight_type)
        _add_matrix(w, p + "ffn_up.weight", mat(n_ff, n_embd), weight_type)
        _add_matrix(w, p + "ffn_down.weight", mat(n_embd, n_ff), weight_type)
    w.add_tensor("output_norm.weight", normw(n_embd))
    if not tied:
        _add_matrix(w, "output.weight", mat(n_vocab, n_embd, 2.0), output_type)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {
        "path": str(path), "seed": seed, "n_layer": n_layer, "n_embd": n_embd, "n_head": n_head,
        "n_head_kv": n_head_kv, "head_dim": head_dim, "n_ff": n_ff, "n_vocab": n_vocab, "n_ctx": n_ctx,
        "weight_type": weight_type, "embd_type": embd_type, "output_type": output_type, "tied": tied,
        "tokens": tokens, "merges": merges, "bos_id": BOS_ID, "eos_id": EOS_ID,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m reference.tiny_model", description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weight-type", default="F32", choices=sorted(QTYPES))
    ap.add_argument("--embd-type", default=None, choices=sorted(QTYPES))
    ap.add_argument("--output-type", default=None, choices=sorted(QTYPES))
    ap.add_argument("--tied", action="store_true")
    a = ap.parse_args(argv)
    info = write_tiny_model(a.out, a.seed, weight_type=a.weight_type, embd_type=a.embd_type,
                            output_type=a.output_type, tied=a.tied)
    print(f"wrote {info['path']} ({info['weight_type']}, tied={info['tied']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
