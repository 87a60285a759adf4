#!/usr/bin/env python3
"""Writes the GGUF fuzzer's seed corpus (fuzz/corpus/*.gguf) with the reference `gguf` package.

Small valid files (each well under 4 KB) that between them use every metadata type, nested
arrays, a custom alignment, every supported tensor type, an unsupported one, and GGUF v2.
Usage: python3 fuzz/make_corpus.py [OUT_DIR]   (default: fuzz/corpus next to this script)
"""
import sys
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT


def write(path, build):
    w = gguf.GGUFWriter(str(path), "llama")
    build(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def every_metadata_type(w):
    for key, vtype, value in [("u8", VT.UINT8, 7), ("i8", VT.INT8, -7), ("u16", VT.UINT16, 700),
                              ("i16", VT.INT16, -700), ("u32", VT.UINT32, 70000),
                              ("i32", VT.INT32, -70000), ("f32", VT.FLOAT32, 0.5),
                              ("b", VT.BOOL, True), ("s", VT.STRING, "text"),
                              ("u64", VT.UINT64, 2**40), ("i64", VT.INT64, -(2**40)),
                              ("f64", VT.FLOAT64, 0.25)]:
        w.add_key_value("t." + key, value, vtype)
    w.add_key_value("t.arr.s", ["a", "bb", ""], VT.ARRAY, sub_type=VT.STRING)
    w.add_key_value("t.arr.u16", [1, 2, 3], VT.ARRAY, sub_type=VT.UINT16)
    w.add_key_value("t.arr.f64", [1.0, -2.0], VT.ARRAY, sub_type=VT.FLOAT64)
    w.add_key_value("t.arr.b", [True, False], VT.ARRAY, sub_type=VT.BOOL)
    w.add_key_value("t.arr.nested", [[1, 2], [3]], VT.ARRAY)


def tensors(w):
    rng = np.random.default_rng(1)
    w.add_custom_alignment(64)
    w.add_uint32("llama.block_count", 1)
    w.add_tensor("f32", rng.standard_normal((2, 4)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal(8).astype(np.float16))
    w.add_tensor("bf16", np.arange(4, dtype=np.uint16), raw_dtype=QT.BF16)
    for qt in (QT.Q8_0, QT.Q4_0, QT.Q4_1):
        w.add_tensor(qt.name.lower(), gguf.quants.quantize(
            rng.standard_normal((1, 32)).astype(np.float32), qt), raw_dtype=qt)


def tokenizer_like(w):
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_array("tokenizer.ggml.tokens", ["<|endoftext|>", "a", "b", "ab", "\u0120a"])
    w.add_array("tokenizer.ggml.token_type", [3, 1, 1, 1, 1])
    w.add_array("tokenizer.ggml.merges", ["a b"])
    w.add_uint32("tokenizer.ggml.bos_token_id", 0)
    w.add_tensor("token_embd.weight", np.zeros((5, 32), dtype=np.float16))


def unsupported(w):
    w.add_tensor("blk.0.ffn_up.weight", np.zeros((1, 176), dtype=np.uint8), raw_dtype=QT.Q5_K)


def main():
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "corpus"
    out.mkdir(parents=True, exist_ok=True)
    for name, build in [("metadata", every_metadata_type), ("tensors", tensors),
                        ("tokenizer", tokenizer_like), ("unsupported", unsupported)]:
        write(out / f"{name}.gguf", build)
    # GGUFWriter only writes v3; v2 has the same layout, so patch the version field.
    v2 = bytearray((out / "tensors.gguf").read_bytes())
    v2[4:8] = (2).to_bytes(4, "little")
    (out / "tensors_v2.gguf").write_bytes(bytes(v2))


if __name__ == "__main__":
    main()
