"""Independent float64 NumPy reference of the decoder forward pass, reading GGUF files.

This module is the oracle that the C++ engine's logits are tested against. It shares no code with
the C++ side: GGUF *parsing* is done by the ``gguf`` PyPI package (``gguf.GGUFReader``).
Dequantization of F32, F16, BF16, Q8_0, Q4_0 and Q4_1 is written here from the block layouts
(``gguf``'s own helpers only cross-validate it in the self-check tests); Q5_0, Q5_1 and the
K-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K are dequantized by ``gguf.quants.dequantize`` (the ``gguf``
package, maintained with the format, is the independent reference for those types; it computes
in float32, i.e. each weight is within 2^-24 relative of its exact value).

Architectures (``general.architecture``): ``llama``, ``qwen2``, ``qwen3``, ``gemma3``; the math
of each is documented in ``ARCHITECTURES`` below and in ``LlamaRef``.

Block layouts (little endian, 32 elements per block):
  Q8_0: fp16 d, 32 x int8 q                       x[j] = d * q[j]
  Q4_0: fp16 d, 16 bytes b                        x[j] = d * ((b[j] & 15) - 8),
                                                  x[j + 16] = d * ((b[j] >> 4) - 8)
  Q4_1: fp16 d, fp16 m, 16 bytes b (same order)   x[j] = d * q[j] + m

Shapes: GGUF dims are in ggml order (ne[0] = row length = input dim). A weight with dims
[n_in, n_out] is returned as a matrix W of shape (n_out, n_in), and y = W @ x.

Forward pass (architecture ``llama``, as llama.cpp computes it; the other architectures are
variations of it, see ARCHITECTURES):
  x = token_embd[token]
  per layer:  h = x + attn_output @ Attn(RoPE(q), RoPE(k), v)  with q/k/v = attn_{q,k,v} @ RMSNorm(x)*attn_norm
              x = h + ffn_down @ (silu(ffn_gate @ n) * (ffn_up @ n)),  n = RMSNorm(h) * ffn_norm
  logits = output @ (RMSNorm(x) * output_norm)   (output = token_embd when output.weight is absent)
  RMSNorm(x) = x / sqrt(mean(x^2) + eps), eps = llama.attention.layer_norm_rms_epsilon.
  RoPE: ggml "normal" mode (adjacent pairs): for i < n_rot/2 the pair (x[2i], x[2i+1]) of each head is
  rotated by angle pos * freq_base^(-2i/n_rot); dims >= n_rot are left unchanged. (GGUF Llama Q/K
  weights are already permuted by the converter for this pairing.)
  Attention: grouped-query (q head h reads kv head h // (n_head / n_head_kv)), scale 1/sqrt(head_dim),
  causal softmax.

Tolerance to expect against a float32 implementation
----------------------------------------------------
Everything here is float64 over the *exactly* dequantized weights, so the only difference to a
correct float32 engine using the same quantized weights is float32 rounding: every dot product
accumulates over 576..1536 terms (SmolLM2-135M: hidden 576, ffn 1536, 30 layers), giving a relative
error per dot product of roughly sqrt(n) * 2^-24 ~ 1e-6..1e-5, which grows through the residual
stream over the layers. Expect the final logits to agree to a relative error (max |diff| divided by
max |logit|) of about 1e-5..1e-4 for straightforward float32 loops; use e.g. ``rtol=1e-3`` /
``atol=1e-3 * max|logits|`` as a comfortable test bound, and compare argmax only where the top-2
margin exceeds that bound. (Measured: this same forward run entirely in float32 NumPy, whose BLAS
sums are blocked and so more accurate than a sequential loop, differs from float64 on SmolLM2-135M
Q4_1, 37 tokens, by max |diff| 5.7e-5 on logits up to 35, i.e. 1.6e-6 relative.) If the
engine quantizes activations (e.g. Q8 activations for the dot products as llama.cpp does on CPU),
the error is much larger (~1e-2 relative) and the comparison should rather be on top-k/argmax.
An engine with f16 KV cache adds ~1e-3 relative error.

CLI (run from tests/python):
  python3 -m reference.llama_ref MODEL --tokens 1,2,3 --out logits.npy [--greedy N]
writes the float64 logits [n_tokens, vocab] of all prompt positions to ``--out`` and, with
``--greedy N``, prints N greedily decoded token ids (KV-cache decoding).
"""

from __future__ import annotations

import argparse
import sys
from typing import Iterable, Sequence

import numpy as np

try:
    import gguf
except ImportError as e:  # pragma: no cover
    raise ImportError("reference.llama_ref needs the 'gguf' package (pip install gguf)") from e


# ggml type ids (stable in the GGUF format spec)
GGML_F32 = 0
GGML_F16 = 1
GGML_Q4_0 = 2
GGML_Q4_1 = 3
GGML_Q5_0 = 6
GGML_Q5_1 = 7
GGML_Q8_0 = 8
GGML_Q2_K = 10
GGML_Q3_K = 11
GGML_Q4_K = 12
GGML_Q5_K = 13
GGML_Q6_K = 14
GGML_BF16 = 30

# type id -> (elements per block, bytes per block)
BLOCK_INFO = {
    GGML_F32: (1, 4),
    GGML_F16: (1, 2),
    GGML_BF16: (1, 2),
    GGML_Q8_0: (32, 34),
    GGML_Q4_0: (32, 18),
    GGML_Q4_1: (32, 20),
    GGML_Q5_0: (32, 22),
    GGML_Q5_1: (32, 24),
    GGML_Q2_K: (256, 84),
    GGML_Q3_K: (256, 110),
    GGML_Q4_K: (256, 144),
    GGML_Q5_K: (256, 176),
    GGML_Q6_K: (256, 210),
}

TYPE_NAMES = {GGML_F32: "F32", GGML_F16: "F16", GGML_BF16: "BF16",
              GGML_Q8_0: "Q8_0", GGML_Q4_0: "Q4_0", GGML_Q4_1: "Q4_1",
              GGML_Q5_0: "Q5_0", GGML_Q5_1: "Q5_1", GGML_Q2_K: "Q2_K", GGML_Q3_K: "Q3_K",
              GGML_Q4_K: "Q4_K", GGML_Q5_K: "Q5_K", GGML_Q6_K: "Q6_K"}

# Types dequantized by gguf.quants.dequantize rather than by the code here.
GGUF_DEQUANT_TYPES = (GGML_Q5_0, GGML_Q5_1, GGML_Q2_K, GGML_Q3_K, GGML_Q4_K, GGML_Q5_K, GGML_Q6_K)


# ----------------------------------------------------------------------------------------------
# Dequantization (own implementation)
# ----------------------------------------------------------------------------------------------

def _f16(b: np.ndarray) -> np.ndarray:
    """(n, 2) uint8 little-endian bytes -> (n,) float64 from IEEE half."""
    return np.ascontiguousarray(b).view("<f2").reshape(-1).astype(np.float64)


def dequantize(raw: np.ndarray | bytes, ggml_type: int, dims: Sequence[int]) -> np.ndarray:
    """Dequantize raw tensor bytes to float64.

    ``dims`` are GGUF/ggml dims (ne[0] first). Returns an array of numpy shape reversed(dims), i.e.
    a 2-D weight [n_in, n_out] becomes (n_out, n_in).
    """
    ggml_type = int(ggml_type)
    dims = [int(d) for d in dims]
    n = int(np.prod(dims)) if dims else 1
    raw = np.frombuffer(raw, dtype=np.uint8) if isinstance(raw, (bytes, bytearray)) else \
        np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    if ggml_type not in BLOCK_INFO:
        raise NotImplementedError(f"unsupported ggml type {ggml_type}")
    blk, bsz = BLOCK_INFO[ggml_type]
    if dims[0] % blk != 0:
        raise ValueError(f"row length {dims[0]} not a multiple of block size {blk}")
    nbytes = n // blk * bsz
    if raw.size < nbytes:
        raise ValueError(f"need {nbytes} bytes, got {raw.size}")
    raw = raw[:nbytes]

    if ggml_type in GGUF_DEQUANT_TYPES:
        rows = raw.reshape(-1, dims[0] // blk * bsz)
        out = np.asarray(gguf.quants.dequantize(rows, gguf.GGMLQuantizationType(ggml_type)),
                         dtype=np.float64)
    elif ggml_type == GGML_F32:
        out = raw.view("<f4").astype(np.float64)
    elif ggml_type == GGML_F16:
        out = raw.view("<f2").astype(np.float64)
    elif ggml_type == GGML_BF16:
        # bf16 is the upper half of an IEEE float32
        out = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    else:
        b = raw.reshape(-1, bsz)
        if ggml_type == GGML_Q8_0:
            d = _f16(b[:, 0:2])
            q = b[:, 2:34].view(np.int8).astype(np.float64)
            out = d[:, None] * q
        elif ggml_type == GGML_Q4_0:
            d = _f16(b[:, 0:2])
            qs = b[:, 2:18]
            q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float64) - 8.0
            out = d[:, None] * q
        elif ggml_type == GGML_Q4_1:
            d = _f16(b[:, 0:2])
            m = _f16(b[:, 2:4])
            qs = b[:, 4:20]
            q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float64)
            out = d[:, None] * q + m[:, None]
        else:  # pragma: no cover
            raise NotImplementedError(ggml_type)
    return out.reshape(-1).reshape(tuple(reversed(dims)))


def tensor_raw_bytes(reader: "gguf.GGUFReader", t) -> np.ndarray:
    """The tensor's raw bytes straight from the file mapping (not via gguf's typed views)."""
    off = int(t.data_offset)
    return np.asarray(reader.data[off: off + int(t.n_bytes)], dtype=np.uint8)


def read_tensor(reader: "gguf.GGUFReader", t) -> np.ndarray:
    """Dequantize a ReaderTensor to float64, numpy shape reversed(ggml dims)."""
    return dequantize(tensor_raw_bytes(reader, t), int(t.tensor_type), [int(x) for x in t.shape])


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------

def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * weight, over the last axis."""
    ms = np.mean(x * x, axis=-1, keepdims=True)
    return x / np.sqrt(ms + eps) * weight


def rope(x: np.ndarray, positions: np.ndarray, n_rot: int, freq_base: float, *, neox: bool = False,
         freq_scale: float = 1.0, freq_factors: np.ndarray | None = None,
         attn_factor: float = 1.0) -> np.ndarray:
    """ggml RoPE without YaRN. x: (n_tokens, n_heads, head_dim); positions: (n_tokens,).

    For i < n_rot/2 the angle is  theta_i = pos * freq_scale * freq_base^(-2i/n_rot) / ff[i]
    (ff = freq_factors, all 1 when absent), and the pair is rotated by theta_i with cos/sin both
    multiplied by attn_factor:
      normal mode (neox=False): the pair is (x[2i], x[2i+1]) -- adjacent values;
      NEOX mode   (neox=True):  the pair is (x[i], x[i + n_rot/2]) -- the two halves.
    Dims >= n_rot are left unchanged.
    """
    x = np.array(x, dtype=np.float64, copy=True)
    half = n_rot // 2
    i = np.arange(half, dtype=np.float64)
    inv_freq = freq_scale * freq_base ** (-2.0 * i / n_rot)               # (half,)
    if freq_factors is not None:
        inv_freq = inv_freq / np.asarray(freq_factors, dtype=np.float64)[:half]
    ang = np.asarray(positions, dtype=np.float64)[:, None] * inv_freq[None, :]  # (T, half)
    c = (np.cos(ang) * attn_factor)[:, None, :]
    s = (np.sin(ang) * attn_factor)[:, None, :]
    if neox:
        i0, i1 = slice(0, half), slice(half, n_rot)
    else:
        i0, i1 = slice(0, n_rot, 2), slice(1, n_rot, 2)
    x0 = x[..., i0].copy()
    x1 = x[..., i1].copy()
    x[..., i0] = x0 * c - x1 * s
    x[..., i1] = x0 * s + x1 * c
    return x


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

    This is the GELU ggml evaluates (its CPU code tabulates this formula at fp16 inputs, an
    implementation shortcut of ~1e-3 relative; the exact float64 formula is the reference), and it
    is also the activation Gemma 3 was trained with (gelu_pytorch_tanh)."""
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    e = np.exp(x - m)
    return e / np.sum(e, axis=axis, keepdims=True)


def swa_layer_pattern(n_layer: int, n_pattern: int) -> list[bool]:
    """Which layers use the sliding window when the file gives a period ``n_pattern``: within every
    group of n_pattern consecutive layers (counted from layer 0) all but the last are sliding-window
    layers, the last is global; n_pattern = 0 makes every layer a sliding-window layer. Gemma 3's
    period is 6: layers 5, 11, 17, ... are global."""
    return [n_pattern == 0 or (il % n_pattern) < n_pattern - 1 for il in range(n_layer)]


def attention_mask(q_pos: np.ndarray, k_pos: np.ndarray, n_swa: int = 0) -> np.ndarray:
    """(T, S) boolean, True where the key is hidden from the query.

    Causal: a query at position p sees keys at positions p0 <= p. With a sliding window of n_swa
    tokens (n_swa > 0) it additionally hides keys with p - p0 >= n_swa, i.e. it sees exactly the
    n_swa positions p - n_swa + 1 ... p (itself included)."""
    d = np.asarray(q_pos)[:, None] - np.asarray(k_pos)[None, :]
    masked = d < 0
    if n_swa > 0:
        masked |= d >= n_swa
    return masked


# ----------------------------------------------------------------------------------------------
# Architectures
# ----------------------------------------------------------------------------------------------

ARCHITECTURES = {
    # name: (RoPE NEOX mode, per-head Q/K RMS norm, Gemma-style block)
    "llama": dict(neox=False, qk_norm=False, gemma=False),
    "qwen2": dict(neox=True, qk_norm=False, gemma=False),
    "qwen3": dict(neox=True, qk_norm=True, gemma=False),
    "gemma3": dict(neox=True, qk_norm=True, gemma=True),
}
"""Per-architecture facts (as llama.cpp runs these GGUF files):

llama   RoPE normal mode (adjacent pairs). Llama 3 RoPE scaling: the converter stores per-pair
        divisors as the F32 tensor ``rope_freqs.weight`` (n_rot/2 values; 1 for high frequencies,
        ``factor`` for low ones, a smooth blend between); each angle is divided by its factor.
        Attention scale 1/sqrt(head_dim).
qwen2   As llama, plus biases added after the Q, K and V projections (``blk.N.attn_{q,k,v}.bias``),
        RoPE in NEOX mode (pairs (i, i + n_rot/2)); optional ``output.bias`` on the logits.
qwen3   As llama without biases, RoPE NEOX mode, and per-head RMS norm of Q and K before RoPE
        (``blk.N.attn_q_norm.weight`` / ``attn_k_norm.weight``, head_dim values, same eps).
gemma3  x0 = token_embd[token] * sqrt(n_embd) (norm weights in the file already include Gemma's
        "+1"; the converter added it). Per layer:
          a  = attn_output @ Attn(...)        q, k per-head RMS-normed (attn_q_norm/attn_k_norm)
                                              before NEOX RoPE; q scaled by 1/sqrt(key_length)
                                              (1/sqrt(n_embd/n_head) for the 62-layer 27B model);
          h  = x + RMSNorm(a) * post_attention_norm
          f  = ffn_down @ (gelu_tanh(ffn_gate @ n) * (ffn_up @ n)),  n = RMSNorm(h) * ffn_norm
          x  = h + RMSNorm(f) * post_ffw_norm
        logits = output @ (RMSNorm(x) * output_norm), output tied to token_embd when absent,
        then cap * tanh(logits / cap) only if ``gemma3.final_logit_softcapping`` is present.
        Sliding window (only when ``gemma3.attention.sliding_window`` > 0): layers with
        il % 6 < 5 (period from ``gemma3.attention.sliding_window_pattern`` when present, or a
        per-layer bool array under that key) attend to the last n_swa positions only (see
        attention_mask). RoPE bases: global layers ``gemma3.rope.freq_base`` with the file's
        linear scaling (``rope.scaling.type`` linear, ``rope.scaling.factor`` F: angles * 1/F);
        sliding-window layers ``gemma3.rope.freq_base_swa`` (10000 when absent) and no scaling.
        Without a sliding_window key every layer is global.

Common: RMSNorm(x) = x / sqrt(mean(x^2) + eps) (eps = ``attention.layer_norm_rms_epsilon``);
grouped-query attention, q head h reads kv head h // (n_head / n_head_kv); RoPE scaling keys
(``rope.scaling.type`` none|linear, ``rope.scaling.factor`` or the older ``rope.scale_linear``,
``rope.scaling.attn_factor``) apply to every non-sliding-window layer; YaRN/LongRoPE are refused.
"""


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------

class KVCache:
    """Per-layer growing K/V arrays, each (n_tokens, n_head_kv, head_dim), float64."""

    def __init__(self, n_layer: int):
        self.k: list[np.ndarray | None] = [None] * n_layer
        self.v: list[np.ndarray | None] = [None] * n_layer

    @property
    def n_tokens(self) -> int:
        return 0 if self.k[0] is None else int(self.k[0].shape[0])

    def append(self, layer: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.k[layer] is None:
            self.k[layer], self.v[layer] = k, v
        else:
            self.k[layer] = np.concatenate([self.k[layer], k], axis=0)
            self.v[layer] = np.concatenate([self.v[layer], v], axis=0)
        return self.k[layer], self.v[layer]


_LAYER_REQUIRED = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                   "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")
_LAYER_OPTIONAL = {
    "llama": ("attn_q.bias", "attn_k.bias", "attn_v.bias", "attn_output.bias"),
    "qwen2": ("attn_q.bias", "attn_k.bias", "attn_v.bias"),
    "qwen3": ("attn_q.bias", "attn_k.bias", "attn_v.bias"),
    "gemma3": ("attn_q.bias", "attn_k.bias", "attn_v.bias"),
}
_LAYER_EXTRA_REQUIRED = {
    "llama": (), "qwen2": (),
    "qwen3": ("attn_q_norm", "attn_k_norm"),
    "gemma3": ("attn_q_norm", "attn_k_norm", "post_attention_norm", "post_ffw_norm"),
}


class LlamaRef:
    """Float64 forward pass (llama, qwen2, qwen3, gemma3) from a GGUF file. Every weight is
    dequantized once at load; every tensor of the file must be used (an unknown tensor is an
    error, so a file with e.g. an unexpected bias is not silently mis-modelled)."""

    def __init__(self, path: str, reader: "gguf.GGUFReader | None" = None):
        """Load ``path``; pass an already-open GGUFReader of the same file to skip re-parsing it."""
        self.path = str(path)
        r = reader if reader is not None else gguf.GGUFReader(self.path)
        self.meta = {}
        for k, f in r.fields.items():
            if k.startswith("tokenizer.ggml.") and k in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                                                            "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
                continue
            try:
                self.meta[k] = f.contents()
            except Exception:  # pragma: no cover - exotic field types
                pass
        arch = self.meta.get("general.architecture")
        if arch not in ARCHITECTURES:
            raise ValueError(f"architecture {arch!r} is not supported (only {sorted(ARCHITECTURES)})")
        self.arch = arch
        feat = ARCHITECTURES[arch]
        self.rope_neox = feat["neox"]
        self.qk_norm = feat["qk_norm"]
        self.gemma = feat["gemma"]

        def m(key, default=None):
            v = self.meta.get(f"{arch}.{key}", default)
            if v is None:
                raise KeyError(f"missing metadata {arch}.{key}")
            return v

        self.n_layer = int(m("block_count"))
        self.n_embd = int(m("embedding_length"))
        self.n_ff = int(m("feed_forward_length"))
        self.n_head = int(m("attention.head_count"))
        self.n_head_kv = int(m("attention.head_count_kv", self.n_head))
        self.head_dim = int(m("attention.key_length", self.n_embd // self.n_head))
        self.head_dim_v = int(m("attention.value_length", self.head_dim))
        self.eps = float(m("attention.layer_norm_rms_epsilon"))
        self.freq_base = float(m("rope.freq_base", 10000.0))
        self.n_rot = int(m("rope.dimension_count", self.head_dim))
        self.n_ctx_train = int(m("context_length", 0))
        if self.n_head % self.n_head_kv != 0:
            raise ValueError("head_count must be a multiple of head_count_kv")

        # RoPE scaling (global layers)
        scaling = str(m("rope.scaling.type", "linear"))
        factor = float(self.meta.get(f"{arch}.rope.scaling.factor",
                                     self.meta.get(f"{arch}.rope.scale_linear", 0.0)))
        if scaling not in ("none", "linear"):
            raise NotImplementedError(f"RoPE scaling type {scaling!r} is not supported")
        self.freq_scale = 1.0 if (scaling == "none" or factor == 0.0) else 1.0 / factor
        self.rope_attn_factor = float(m("rope.scaling.attn_factor", 1.0))

        # attention scale, sliding window, final soft-capping
        self.attn_scale = 1.0 / np.sqrt(self.head_dim)
        self.n_swa = 0
        self.swa_layers = [False] * self.n_layer
        self.freq_base_swa = self.freq_base
        self.final_softcap = 0.0
        if self.gemma:
            if self.n_layer == 62:   # Gemma 3 27B: scaled by the hidden size per head instead
                self.attn_scale = 1.0 / np.sqrt(self.n_embd // self.n_head)
            self.n_swa = int(m("attention.sliding_window", 0))
            if self.n_swa > 0:
                pat = self.meta.get(f"{arch}.attention.sliding_window_pattern", 6)
                if isinstance(pat, (list, tuple)):
                    self.swa_layers = [bool(b) for b in pat][:self.n_layer]
                    if len(self.swa_layers) != self.n_layer:
                        raise ValueError("sliding_window_pattern array shorter than block_count")
                else:
                    self.swa_layers = swa_layer_pattern(self.n_layer, int(pat))
                self.freq_base_swa = float(m("rope.freq_base_swa", 10000.0))
            self.final_softcap = float(m("final_logit_softcapping", 0.0))

        self.tensor_types: dict[str, int] = {}
        w: dict[str, np.ndarray] = {}
        for t in r.tensors:
            self.tensor_types[t.name] = int(t.tensor_type)
            w[t.name] = read_tensor(r, t)
        self.weights = w                                               # name -> float64 array
        used = set()

        def take(name: str, required: bool = True):
            if name not in w:
                if required:
                    raise KeyError(f"missing tensor {name}")
                return None
            used.add(name)
            return w[name]

        self.tok_embd = take("token_embd.weight")                     # (vocab, n_embd)
        self.n_vocab = int(self.tok_embd.shape[0])
        self.output_norm = take("output_norm.weight")
        self.tied = "output.weight" not in w
        self.output = self.tok_embd if self.tied else take("output.weight")  # (vocab, n_embd)
        self.output_bias = take("output.bias", False) if arch == "qwen2" else None
        self.rope_freqs = take("rope_freqs.weight", False) if arch == "llama" else None
        if self.rope_freqs is not None:
            self.rope_freqs = self.rope_freqs.reshape(-1)
            if self.rope_freqs.size < self.n_rot // 2:
                raise ValueError("rope_freqs.weight needs n_rot/2 values")
        self.layers = []
        for i in range(self.n_layer):
            p = f"blk.{i}."
            L = {k: take(p + k + ".weight") for k in _LAYER_REQUIRED + _LAYER_EXTRA_REQUIRED[arch]}
            for k in _LAYER_OPTIONAL[arch]:
                v = take(p + k, False)
                if v is not None:
                    L[k] = v
            self.layers.append(L)
        unused = sorted(set(w) - used)
        if unused:
            raise ValueError(f"tensors this reference does not model for {arch}: {unused[:8]}")
        # sanity on shapes
        L0 = self.layers[0]
        assert L0["attn_q"].shape == (self.n_head * self.head_dim, self.n_embd)
        assert L0["attn_k"].shape == (self.n_head_kv * self.head_dim, self.n_embd)
        assert L0["attn_v"].shape == (self.n_head_kv * self.head_dim_v, self.n_embd)
        assert L0["attn_output"].shape == (self.n_embd, self.n_head * self.head_dim_v)
        assert self.output.shape == (self.n_vocab, self.n_embd)
        if self.qk_norm:
            assert L0["attn_q_norm"].shape == (self.head_dim,)
            assert L0["attn_k_norm"].shape == (self.head_dim,)
        del r

    # -- core -----------------------------------------------------------------------------------

    def _attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos: np.ndarray,
                   n_swa: int = 0) -> np.ndarray:
        """q: (T, H, D) at absolute positions q_pos; k, v: (S, Hkv, D) at positions 0..S-1."""
        group = self.n_head // self.n_head_kv
        kh = np.repeat(k, group, axis=1)                # head h -> kv head h // group
        vh = np.repeat(v, group, axis=1)
        scores = np.einsum("thd,shd->hts", q, kh) * self.attn_scale
        mask = attention_mask(q_pos, np.arange(k.shape[0]), n_swa)
        scores = np.where(mask[None, :, :], -np.inf, scores)
        p = softmax(scores, axis=-1)
        out = np.einsum("hts,shd->thd", p, vh)
        return out.reshape(q.shape[0], self.n_head * self.head_dim_v)

    def layer_rope(self, li: int) -> dict:
        """RoPE parameters of layer li (keyword arguments of ``rope`` besides x/positions/n_rot)."""
        if self.swa_layers[li]:
            return dict(freq_base=self.freq_base_swa, neox=self.rope_neox, freq_scale=1.0,
                        freq_factors=None, attn_factor=self.rope_attn_factor)
        return dict(freq_base=self.freq_base, neox=self.rope_neox, freq_scale=self.freq_scale,
                    freq_factors=self.rope_freqs, attn_factor=self.rope_attn_factor)

    def forward(self, tokens: Sequence[int], cache: KVCache | None = None,
                last_only: bool = False) -> np.ndarray:
        """Run new tokens (positions cache.n_tokens ...) and return logits (T, vocab) or (1, vocab)."""
        tokens = np.asarray(list(tokens), dtype=np.int64)
        if tokens.ndim != 1 or tokens.size == 0:
            raise ValueError("tokens must be a non-empty 1-D sequence")
        if tokens.min() < 0 or tokens.max() >= self.n_vocab:
            raise ValueError("token id out of range")
        if cache is None:
            cache = KVCache(self.n_layer)
        start = cache.n_tokens
        T = tokens.size
        pos = np.arange(start, start + T)
        x = self.tok_embd[tokens].copy()                # (T, n_embd)
        if self.gemma:
            x = x * np.sqrt(self.n_embd)
        for li, L in enumerate(self.layers):
            h = rms_norm(x, L["attn_norm"], self.eps)
            q = h @ L["attn_q"].T
            k = h @ L["attn_k"].T
            v = h @ L["attn_v"].T
            if "attn_q.bias" in L:
                q = q + L["attn_q.bias"]
            if "attn_k.bias" in L:
                k = k + L["attn_k.bias"]
            if "attn_v.bias" in L:
                v = v + L["attn_v.bias"]
            q = q.reshape(T, self.n_head, self.head_dim)
            k = k.reshape(T, self.n_head_kv, self.head_dim)
            v = v.reshape(T, self.n_head_kv, self.head_dim_v)
            if self.qk_norm:
                q = rms_norm(q, L["attn_q_norm"], self.eps)
                k = rms_norm(k, L["attn_k_norm"], self.eps)
            rp = self.layer_rope(li)
            q = rope(q, pos, self.n_rot, **rp)
            k = rope(k, pos, self.n_rot, **rp)
            K, V = cache.append(li, k, v)
            a = self._attention(q, K, V, pos, self.n_swa if self.swa_layers[li] else 0)
            a = a @ L["attn_output"].T
            if "attn_output.bias" in L:
                a = a + L["attn_output.bias"]
            if self.gemma:
                a = rms_norm(a, L["post_attention_norm"], self.eps)
            x = x + a
            h = rms_norm(x, L["ffn_norm"], self.eps)
            g = h @ L["ffn_gate"].T
            u = h @ L["ffn_up"].T
            if self.gemma:
                f = (gelu_tanh(g) * u) @ L["ffn_down"].T
                x = x + rms_norm(f, L["post_ffw_norm"], self.eps)
            else:
                x = x + (silu(g) * u) @ L["ffn_down"].T
        if last_only:
            x = x[-1:]
        x = rms_norm(x, self.output_norm, self.eps)
        logits = x @ self.output.T
        if self.output_bias is not None:
            logits = logits + self.output_bias
        if self.final_softcap:
            logits = self.final_softcap * np.tanh(logits / self.final_softcap)
        return logits

    # -- public API ------------------------------------------------------------------------------

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Full recompute: float64 logits [n_tokens, vocab] for every prompt position."""
        return self.forward(tokens, KVCache(self.n_layer))

    def greedy(self, tokens: Sequence[int], n_steps: int, return_logits: bool = False):
        """Greedy decoding with a NumPy KV cache. Returns the n_steps new token ids
        (and, with return_logits, the list of the logits vectors each was chosen from)."""
        cache = KVCache(self.n_layer)
        out: list[int] = []
        lg_list = []
        if n_steps <= 0:
            return (out, lg_list) if return_logits else out
        lg = self.forward(tokens, cache, last_only=True)[-1]
        for step in range(n_steps):
            nxt = int(np.argmax(lg))
            out.append(nxt)
            lg_list.append(lg)
            if step + 1 < n_steps:
                lg = self.forward([nxt], cache, last_only=True)[-1]
        return (out, lg_list) if return_logits else out


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

def _parse_tokens(s: str) -> list[int]:
    return [int(t) for t in s.replace(" ", "").split(",") if t != ""]


def main(argv: Iterable[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m reference.llama_ref",
                                 description="float64 NumPy reference forward pass from GGUF")
    ap.add_argument("model", help="path to a llama, qwen2, qwen3 or gemma3 GGUF file")
    ap.add_argument("--tokens", required=True, help="comma-separated prompt token ids, e.g. 1,2,3")
    ap.add_argument("--out", help="write float64 logits [n_tokens, vocab] to this .npy file")
    ap.add_argument("--greedy", type=int, default=0, help="also greedy-decode N tokens and print their ids")
    args = ap.parse_args(None if argv is None else list(argv))
    model = LlamaRef(args.model)
    toks = _parse_tokens(args.tokens)
    lg = model.logits(toks)
    if args.out:
        np.save(args.out, lg)
    print(f"n_tokens={lg.shape[0]} vocab={lg.shape[1]} argmax_last={int(np.argmax(lg[-1]))} "
          f"max_abs={float(np.max(np.abs(lg))):.6g}")
    if args.greedy > 0:
        print("greedy:", ",".join(str(t) for t in model.greedy(toks, args.greedy)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
