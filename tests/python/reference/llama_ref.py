"""Independent float64 NumPy reference of the Llama forward pass, reading GGUF files.

This module is the oracle that the C++ engine's logits are tested against. It shares no code with
the C++ side: GGUF *parsing* is done by the ``gguf`` PyPI package (``gguf.GGUFReader``), but
dequantization is written here from the block layouts (``gguf``'s own dequantize helpers are only
used by the self-check tests, to cross-validate ours).

Supported tensor types: F32, F16, BF16, Q8_0, Q4_0, Q4_1.

Block layouts (little endian, 32 elements per block):
  Q8_0: fp16 d, 32 x int8 q                       x[j] = d * q[j]
  Q4_0: fp16 d, 16 bytes b                        x[j] = d * ((b[j] & 15) - 8),
                                                  x[j + 16] = d * ((b[j] >> 4) - 8)
  Q4_1: fp16 d, fp16 m, 16 bytes b (same order)   x[j] = d * q[j] + m

Shapes: GGUF dims are in ggml order (ne[0] = row length = input dim). A weight with dims
[n_in, n_out] is returned as a matrix W of shape (n_out, n_in), and y = W @ x.

Forward pass (architecture ``llama``, as llama.cpp computes it):
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
GGML_Q8_0 = 8
GGML_BF16 = 30

# type id -> (elements per block, bytes per block)
BLOCK_INFO = {
    GGML_F32: (1, 4),
    GGML_F16: (1, 2),
    GGML_BF16: (1, 2),
    GGML_Q8_0: (32, 34),
    GGML_Q4_0: (32, 18),
    GGML_Q4_1: (32, 20),
}

TYPE_NAMES = {GGML_F32: "F32", GGML_F16: "F16", GGML_BF16: "BF16",
              GGML_Q8_0: "Q8_0", GGML_Q4_0: "Q4_0", GGML_Q4_1: "Q4_1"}


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

    if ggml_type == GGML_F32:
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


def rope(x: np.ndarray, positions: np.ndarray, n_rot: int, freq_base: float) -> np.ndarray:
    """ggml normal-mode RoPE. x: (n_tokens, n_heads, head_dim); positions: (n_tokens,).

    Pair (x[2i], x[2i+1]) is rotated by angle pos * freq_base^(-2i/n_rot), for 2i < n_rot.
    """
    x = np.array(x, dtype=np.float64, copy=True)
    half = n_rot // 2
    i = np.arange(half, dtype=np.float64)
    inv_freq = freq_base ** (-2.0 * i / n_rot)                       # (half,)
    ang = np.asarray(positions, dtype=np.float64)[:, None] * inv_freq[None, :]  # (T, half)
    c = np.cos(ang)[:, None, :]
    s = np.sin(ang)[:, None, :]
    x0 = x[..., 0:n_rot:2].copy()
    x1 = x[..., 1:n_rot:2].copy()
    x[..., 0:n_rot:2] = x0 * c - x1 * s
    x[..., 1:n_rot:2] = x0 * s + x1 * c
    return x


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    e = np.exp(x - m)
    return e / np.sum(e, axis=axis, keepdims=True)


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


class LlamaRef:
    """Float64 Llama forward from a GGUF file. Every weight is dequantized once at load."""

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
        if arch != "llama":
            raise ValueError(f"only architecture 'llama' is supported, got {arch!r}")

        def m(key, default=None):
            v = self.meta.get(f"llama.{key}", default)
            if v is None:
                raise KeyError(f"missing metadata llama.{key}")
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

        self.tensor_types: dict[str, int] = {}
        w: dict[str, np.ndarray] = {}
        for t in r.tensors:
            self.tensor_types[t.name] = int(t.tensor_type)
            w[t.name] = read_tensor(r, t)
        self.weights = w                                               # name -> float64 array
        self.tok_embd = w["token_embd.weight"]                         # (vocab, n_embd)
        self.n_vocab = int(self.tok_embd.shape[0])
        self.output_norm = w["output_norm.weight"]
        self.tied = "output.weight" not in w
        self.output = self.tok_embd if self.tied else w["output.weight"]  # (vocab, n_embd)
        self.layers = []
        for i in range(self.n_layer):
            p = f"blk.{i}."
            self.layers.append({k: w[p + k + ".weight"] for k in (
                "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")})
        # sanity on shapes
        L0 = self.layers[0]
        assert L0["attn_q"].shape == (self.n_head * self.head_dim, self.n_embd)
        assert L0["attn_k"].shape == (self.n_head_kv * self.head_dim, self.n_embd)
        assert L0["attn_v"].shape == (self.n_head_kv * self.head_dim_v, self.n_embd)
        assert L0["attn_output"].shape == (self.n_embd, self.n_head * self.head_dim_v)
        assert self.output.shape == (self.n_vocab, self.n_embd)
        del r

    # -- core -----------------------------------------------------------------------------------

    def _attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos: np.ndarray) -> np.ndarray:
        """q: (T, H, D) at absolute positions q_pos; k, v: (S, Hkv, D) at positions 0..S-1."""
        group = self.n_head // self.n_head_kv
        kh = np.repeat(k, group, axis=1)                # head h -> kv head h // group
        vh = np.repeat(v, group, axis=1)
        scores = np.einsum("thd,shd->hts", q, kh) / np.sqrt(self.head_dim)
        S = k.shape[0]
        mask = np.arange(S)[None, :] > q_pos[:, None]   # (T, S): key after query -> masked
        scores = np.where(mask[None, :, :], -np.inf, scores)
        p = softmax(scores, axis=-1)
        out = np.einsum("hts,shd->thd", p, vh)
        return out.reshape(q.shape[0], self.n_head * self.head_dim_v)

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
        for li, L in enumerate(self.layers):
            h = rms_norm(x, L["attn_norm"], self.eps)
            q = (h @ L["attn_q"].T).reshape(T, self.n_head, self.head_dim)
            k = (h @ L["attn_k"].T).reshape(T, self.n_head_kv, self.head_dim)
            v = (h @ L["attn_v"].T).reshape(T, self.n_head_kv, self.head_dim_v)
            q = rope(q, pos, self.n_rot, self.freq_base)
            k = rope(k, pos, self.n_rot, self.freq_base)
            K, V = cache.append(li, k, v)
            a = self._attention(q, K, V, pos)
            x = x + a @ L["attn_output"].T
            h = rms_norm(x, L["ffn_norm"], self.eps)
            g = h @ L["ffn_gate"].T
            u = h @ L["ffn_up"].T
            x = x + (silu(g) * u) @ L["ffn_down"].T
        if last_only:
            x = x[-1:]
        x = rms_norm(x, self.output_norm, self.eps)
        return x @ self.output.T

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
                                 description="float64 NumPy reference Llama forward from GGUF")
    ap.add_argument("model", help="path to a llama GGUF file")
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
