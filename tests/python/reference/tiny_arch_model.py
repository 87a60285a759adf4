"""Tiny random GGUF models of the architectures llama (with Llama 3 RoPE factors), qwen2, qwen3 and
gemma3, in every weight type the reference reads, for tests against reference.llama_ref.

Shape (all architectures): hidden 256, ffn 512, vocab 300 (reference.tiny_model's GPT-2 style
byte-level vocabulary and merges, ids 0..2 control, bos 1, eos 2), 4 query heads; every matrix
row length (256 or 512) is a multiple of 256, as the K-quants need.

  arch     layers  heads/kv  head_dim  extras
  llama    2       4/2       64        ``rope_freqs.weight`` (Llama 3 factors, see below);
                                       optionally ``llama.rope.scaling.type`` = linear and
                                       ``llama.rope.scaling.factor``
  qwen2    2       4/2       64        ``blk.N.attn_{q,k,v}.bias`` (F32), tied output
  qwen3    2       4/2       128       ``blk.N.attn_{q,k}_norm.weight`` (F32, head_dim values),
                                       ``qwen3.attention.key_length/value_length`` = 128
  gemma3   6       4/1       128       ``attn_{q,k}_norm``, ``post_attention_norm``, ``post_ffw_norm``
                                       (all F32; post norms ~2, embeddings std 1/16), tied output, ``gemma3.attention.sliding_window``
                                       (8 by default: layers 0-4 slide, layer 5 is global),
                                       ``gemma3.rope.freq_base`` 1e6 (global layers); optionally
                                       ``gemma3.rope.freq_base_swa``, ``gemma3.final_logit_softcapping``

Metadata written under the architecture's prefix, as converted files have it: context_length,
embedding_length, block_count, feed_forward_length, attention.head_count, attention.head_count_kv,
attention.layer_norm_rms_epsilon, rope.freq_base, plus attention.key_length/value_length (qwen3,
gemma3), rope.dimension_count (llama), attention.sliding_window (gemma3).

Weight types (``weight_type``, used for token_embd, output and every 2-D layer matrix unless
``embd_type`` is given; norms and biases are F32):
  F32, F16, BF16, Q8_0, Q4_0, Q4_1  quantized from random normal matrices (reference.tiny_model);
  Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K  written as random *quantized blocks*: uniformly
  random bytes (every byte pattern is a valid block), then the fp16 scale fields set so that the
  matrix has the intended standard deviation (each block's d times a random factor in
  [0.5, 1.5]; the min fields d_min / m set to cancel the mean of the unsigned codes). Q6_K's
  int8 sub-block scales are drawn in [-32, 32) so that d stays a normal fp16 number. Field
  offsets in the block (bytes): Q5_0 d@0; Q5_1 d@0 m@2; Q2_K d@80 dmin@82; Q3_K d@108;
  Q4_K/Q5_K d@0 dmin@2; Q6_K d@208 (int8 scales @192..207).

Llama 3 RoPE factors (``rope_freqs.weight``): for pair i with wavelength
lambda_i = 2 pi base^(2i/n_rot): 1 if lambda_i < L/high, ``factor`` if lambda_i > L/low, else
1 / ((1 - s)/factor + s) with s = (L/lambda_i - low)/(high - low); the tiny model uses factor 8,
low 1, high 4 and L = 32 (so that the factors vary over the dims that matter at test lengths).

CLI (from tests/python):  python3 -m reference.tiny_arch_model OUT.gguf --arch gemma3 --weight-type Q4_K
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

import numpy as np
import gguf

from .llama_ref import BLOCK_INFO
from .tiny_model import BYTE_TOKEN_BASE, QTYPES, add_tiny_vocab, make_vocab, quantize

RANDOM_BLOCK_TYPES = ("Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
ALL_TYPES = tuple(QTYPES) + RANDOM_BLOCK_TYPES
ARCHS = ("llama", "qwen2", "qwen3", "gemma3")

# type -> (offset of fp16 d, offset of fp16 min field or None, min/d ratio that centres the codes)
SCALE_FIELDS = {
    "Q5_0": (0, None, 0.0),
    "Q5_1": (0, 2, -15.5),     # x = d*q + m, q in 0..31
    "Q2_K": (80, 82, 1.5),     # x = d*sc*q - dmin*m, q in 0..3, sc/m in 0..15
    "Q3_K": (108, None, 0.0),
    "Q4_K": (0, 2, 7.5),       # q in 0..15, sc/m in 0..63
    "Q5_K": (0, 2, 15.5),      # q in 0..31
    "Q6_K": (208, None, 0.0),
}


def _qtype(name: str) -> gguf.GGMLQuantizationType:
    return gguf.GGMLQuantizationType[name]


def set_block_scales(raw: np.ndarray, type_name: str, d: np.ndarray) -> None:
    """Write per-block fp16 scale d (and the centring min field) into raw blocks (nb, bsz), in place."""
    off_d, off_m, ratio = SCALE_FIELDS[type_name]
    raw[:, off_d:off_d + 2] = d.astype("<f2").view(np.uint8).reshape(-1, 2)
    if off_m is not None:
        raw[:, off_m:off_m + 2] = (d * ratio).astype("<f2").view(np.uint8).reshape(-1, 2)


def random_quant_matrix(rng: np.random.Generator, n_out: int, n_in: int, type_name: str,
                        std: float) -> np.ndarray:
    """Random quantized blocks of ``type_name`` whose dequantized matrix (n_out, n_in) has about
    the given standard deviation; returns raw bytes (n_out, row_bytes)."""
    qt = _qtype(type_name)
    blk, bsz = BLOCK_INFO[int(qt)]
    if n_in % blk:
        raise ValueError(f"{type_name} rows need a multiple of {blk} values, got {n_in}")
    nb = n_out * n_in // blk
    raw = rng.integers(0, 256, size=(nb, bsz), dtype=np.uint8)
    if type_name == "Q6_K":   # int8 sub-block scales in [-32, 32)
        raw[:, 192:208] = rng.integers(-32, 32, size=(nb, 16)).astype(np.int8).view(np.uint8)
    u = rng.uniform(0.5, 1.5, size=nb)
    set_block_scales(raw, type_name, u)
    deq = gguf.quants.dequantize(raw.reshape(n_out, -1), qt).astype(np.float64)
    s = float(np.std(deq))
    set_block_scales(raw, type_name, u * (std / s))
    return raw.reshape(n_out, -1)


def llama3_rope_factors(n_rot: int, base: float, factor: float = 8.0, low: float = 1.0,
                        high: float = 4.0, orig_ctx: int = 32) -> np.ndarray:
    """The per-pair divisors a Llama 3 conversion stores as rope_freqs.weight (see module doc)."""
    out = []
    for i in range(n_rot // 2):
        wavelen = 2 * math.pi * base ** (2 * i / n_rot)
        if wavelen < orig_ctx / high:
            out.append(1.0)
        elif wavelen > orig_ctx / low:
            out.append(factor)
        else:
            s = (orig_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - s) / factor + s))
    return np.asarray(out, dtype=np.float32)


ARCH_DEFAULTS = {
    "llama": dict(n_layer=2, n_head=4, n_head_kv=2, head_dim=64, rope_freq_base=10000.0),
    "qwen2": dict(n_layer=2, n_head=4, n_head_kv=2, head_dim=64, rope_freq_base=1000000.0),
    "qwen3": dict(n_layer=2, n_head=4, n_head_kv=2, head_dim=128, rope_freq_base=1000000.0),
    "gemma3": dict(n_layer=6, n_head=4, n_head_kv=1, head_dim=128, rope_freq_base=1000000.0),
}


def write_tiny_arch_model(path: str, arch: str, seed: int = 0, *, weight_type: str = "F32",
                          embd_type: str | None = None, n_embd: int = 256, n_ff: int = 512,
                          n_vocab: int = 300, n_ctx: int = 512, rms_eps: float = 1e-6,
                          n_layer: int | None = None, tied: bool | None = None,
                          rope_freqs: bool = True, rope_scaling_factor: float | None = None,
                          sliding_window: int = 8, rope_freq_base_swa: float | None = None,
                          final_logit_softcapping: float | None = None,
                          ascii_vocab: bool = False) -> dict[str, Any]:
    """Write a tiny random ``arch`` GGUF to ``path`` (see the module doc); returns a description.

    ``rope_freqs`` / ``rope_scaling_factor``: llama only. ``sliding_window`` (0 = none),
    ``rope_freq_base_swa`` and ``final_logit_softcapping``: gemma3 only. ``ascii_vocab`` renames
    every non-control token to the ASCII text "w<id>." (same ids, types and merges): llama.cpp's
    server reports log-probabilities only for tokens that complete UTF-8 text, which single
    byte tokens >= 0x80 do not (used when recording its outputs for the self-check)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch}")
    embd_type = embd_type or weight_type
    for t in (weight_type, embd_type):
        if t not in ALL_TYPES:
            raise ValueError(f"unknown type {t}; choose from {ALL_TYPES}")
    cfg = dict(ARCH_DEFAULTS[arch])
    if n_layer is not None:
        cfg["n_layer"] = n_layer
    n_head, n_head_kv, hd = cfg["n_head"], cfg["n_head_kv"], cfg["head_dim"]
    if tied is None:
        tied = arch in ("qwen2", "gemma3")
    rng = np.random.default_rng(seed)

    def add_matrix(w: gguf.GGUFWriter, name: str, n_out: int, n_in: int, scale: float, tname: str):
        std = scale / np.sqrt(n_in)
        if tname in RANDOM_BLOCK_TYPES:
            w.add_tensor(name, random_quant_matrix(rng, n_out, n_in, tname, std), raw_dtype=_qtype(tname))
            return
        data = quantize((rng.standard_normal((n_out, n_in)) * std).astype(np.float32), tname)
        if tname in ("F32", "F16"):
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_dtype=QTYPES[tname])

    def vec(n: int, mean: float, sd: float) -> np.ndarray:
        return (mean + sd * rng.standard_normal(n)).astype(np.float32)

    tokens, types, merges = make_vocab(n_vocab)
    if ascii_vocab:
        tokens = tokens[:BYTE_TOKEN_BASE] + [f"w{i}." for i in range(BYTE_TOKEN_BASE, n_vocab)]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}-seed{seed}")
    w.add_block_count(cfg["n_layer"])
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_freq_base(float(cfg["rope_freq_base"]))
    w.add_layer_norm_rms_eps(float(rms_eps))
    if hd != n_embd // n_head or arch in ("qwen3", "gemma3"):
        w.add_key_length(hd)
        w.add_value_length(hd)
    if arch == "llama":
        w.add_rope_dimension_count(hd)
        if rope_scaling_factor is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(rope_scaling_factor))
    if arch == "gemma3":
        if sliding_window:
            w.add_sliding_window(int(sliding_window))
        if rope_freq_base_swa is not None:
            w.add_rope_freq_base_swa(float(rope_freq_base_swa))
        if final_logit_softcapping is not None:
            w.add_final_logit_softcapping(float(final_logit_softcapping))
    add_tiny_vocab(w, n_vocab, tokens, types, merges)

    # Gemma multiplies the tied embeddings by sqrt(n_embd) on input: smaller rows and larger post-norm
    # weights there keep the logits from being dominated by "repeat the input token".
    embd_scale, post_norm = (1.0, 2.0) if arch == "gemma3" else (2.0, 1.0)
    add_matrix(w, "token_embd.weight", n_vocab, n_embd, embd_scale, embd_type)
    if arch == "llama" and rope_freqs:
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(hd, cfg["rope_freq_base"]))
    for i in range(cfg["n_layer"]):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", vec(n_embd, 1.0, 0.1))
        add_matrix(w, p + "attn_q.weight", n_head * hd, n_embd, 2.0, weight_type)
        add_matrix(w, p + "attn_k.weight", n_head_kv * hd, n_embd, 2.0, weight_type)
        add_matrix(w, p + "attn_v.weight", n_head_kv * hd, n_embd, 1.0, weight_type)
        if arch == "qwen2":
            w.add_tensor(p + "attn_q.bias", vec(n_head * hd, 0.0, 0.5))
            w.add_tensor(p + "attn_k.bias", vec(n_head_kv * hd, 0.0, 0.5))
            w.add_tensor(p + "attn_v.bias", vec(n_head_kv * hd, 0.0, 0.5))
        if arch in ("qwen3", "gemma3"):
            w.add_tensor(p + "attn_q_norm.weight", vec(hd, 1.0, 0.2))
            w.add_tensor(p + "attn_k_norm.weight", vec(hd, 1.0, 0.2))
        add_matrix(w, p + "attn_output.weight", n_embd, n_head * hd, 1.0, weight_type)
        if arch == "gemma3":
            w.add_tensor(p + "post_attention_norm.weight", vec(n_embd, post_norm, 0.2))
        w.add_tensor(p + "ffn_norm.weight", vec(n_embd, 1.0, 0.1))
        add_matrix(w, p + "ffn_gate.weight", n_ff, n_embd, 1.0, weight_type)
        add_matrix(w, p + "ffn_up.weight", n_ff, n_embd, 1.0, weight_type)
        add_matrix(w, p + "ffn_down.weight", n_embd, n_ff, 1.0, weight_type)
        if arch == "gemma3":
            w.add_tensor(p + "post_ffw_norm.weight", vec(n_embd, post_norm, 0.2))
    w.add_tensor("output_norm.weight", vec(n_embd, 1.0, 0.1))
    if not tied:
        add_matrix(w, "output.weight", n_vocab, n_embd, 2.0, weight_type)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"path": str(path), "arch": arch, "seed": seed, "weight_type": weight_type,
            "embd_type": embd_type, "n_embd": n_embd, "n_ff": n_ff, "n_vocab": n_vocab,
            "tied": tied, "sliding_window": sliding_window if arch == "gemma3" else 0, **cfg}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m reference.tiny_arch_model", description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--arch", default="gemma3", choices=ARCHS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weight-type", default="F32", choices=ALL_TYPES)
    ap.add_argument("--embd-type", default=None, choices=ALL_TYPES)
    a = ap.parse_args(argv)
    info = write_tiny_arch_model(a.out, a.arch, a.seed, weight_type=a.weight_type, embd_type=a.embd_type)
    print(f"wrote {info['path']} ({info['arch']}, {info['weight_type']}, tied={info['tied']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
