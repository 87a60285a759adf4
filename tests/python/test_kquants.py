"""CortexStream's dequantization of the 5-bit and K-quant weight types against the `gguf`
package's (`gguf.quants.dequantize`, an independent implementation of ggml's block layouts).

The kernels' canonical floats (src/kernels/weights.h) are the float32 values ggml computes, so
the comparison is bit for bit, for every type:
- blocks made by `gguf.quants.quantize` from random floats, for the types the package can
  quantize (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0);
- random bytes (every bit pattern of the quants and sub-block scales, with finite fp16 scales)
  for every quantized type, K-quants included (the package cannot quantize those);
- real tensors of Gemma 3 270M Q4_K_M (Q8_0, Q5_0, Q4_K, Q6_K), fetched by
  `scripts/fetch_model.sh gemma3-270m`.
Our side runs through `dequant_tool` (tests/kernels/dequant_tool.cpp, built with the tests), which
calls kernels::dequantizeRow.
"""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import quants

REPO = Path(__file__).resolve().parent.parent.parent
TOOL = Path(os.environ.get("CORTEXSTREAM_DEQUANT_TOOL",
                           REPO / "build" / "tests" / "kernels" / "dequant_tool"))
GEMMA = REPO / "models" / "gemma-3-270m-q4_k_m.gguf"

# type: (elements per block, bytes per block, byte offsets of the fp16 scale fields)
LAYOUTS = {
    "Q8_0": (32, 34, [0]),
    "Q4_0": (32, 18, [0]),
    "Q4_1": (32, 20, [0, 2]),
    "Q5_0": (32, 22, [0]),
    "Q5_1": (32, 24, [0, 2]),
    "Q2_K": (256, 84, [80, 82]),
    "Q3_K": (256, 110, [108]),
    "Q4_K": (256, 144, [0, 2]),
    "Q5_K": (256, 176, [0, 2]),
    "Q6_K": (256, 210, [208]),
}


def tool() -> Path:
    if not TOOL.exists():
        pytest.fail(f"{TOOL} is missing: build it with `scripts/build.sh release dequant_tool` "
                    "(or set CORTEXSTREAM_DEQUANT_TOOL)")
    return TOOL


def ours(raw: np.ndarray, type_name: str, cols: int, tmp_path: Path) -> np.ndarray:
    src, dst = tmp_path / f"{type_name}.bin", tmp_path / f"{type_name}.f32"
    np.ascontiguousarray(raw, dtype=np.uint8).tofile(src)
    proc = subprocess.run([str(tool()), type_name, str(cols), str(src), str(dst)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return np.fromfile(dst, dtype=np.float32).reshape(-1, cols)


def assert_bits_equal(got: np.ndarray, want: np.ndarray, what: str) -> None:
    want = np.asarray(want, dtype=np.float32).reshape(got.shape)
    same = got.view(np.uint32) == want.view(np.uint32)
    if not same.all():
        r, c = np.argwhere(~same)[0]
        pytest.fail(f"{what}: {int((~same).sum())} of {same.size} floats differ, first at "
                    f"[{r}, {c}]: ours {got[r, c]!r}, gguf {want[r, c]!r}")


def random_blocks(type_name: str, rows: int, cols: int, seed: int) -> np.ndarray:
    """Random bytes in the layout, with finite fp16 scales (d of either sign, m/dmin as ggml's)."""
    elems, nbytes, halves = LAYOUTS[type_name]
    rng = np.random.default_rng(seed)
    nblocks = rows * cols // elems
    raw = rng.integers(0, 256, (nblocks, nbytes), dtype=np.uint8)
    for i, at in enumerate(halves):
        mag = rng.uniform(1e-4, 0.1, nblocks)
        if i == 0:
            mag *= rng.choice([-1.0, 1.0], nblocks)
        elif type_name == "Q5_1" or type_name == "Q4_1":
            mag = -mag  # the block minimum
        raw[:, at:at + 2] = mag.astype(np.float16).view(np.uint8).reshape(nblocks, 2)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_quantized_by_gguf(type_name: str, tmp_path: Path) -> None:
    rows, cols = 64, 640
    x = np.random.default_rng(1).standard_normal((rows, cols)).astype(np.float32)
    x[3] = 0.0  # an all-zero row: zero scales
    raw = quants.quantize(x, QT[type_name])
    assert_bits_equal(ours(raw, type_name, cols, tmp_path), quants.dequantize(raw, QT[type_name]),
                      type_name)


@pytest.mark.parametrize("type_name", list(LAYOUTS))
def test_random_blocks(type_name: str, tmp_path: Path) -> None:
    rows, cols = 48, 1024
    raw = random_blocks(type_name, rows, cols, seed=sum(map(ord, type_name)))
    assert_bits_equal(ours(raw, type_name, cols, tmp_path), quants.dequantize(raw, QT[type_name]),
                      type_name)


def rejects(type_name: str, cols: int, nbytes: int, tmp_path: Path) -> str:
    src = tmp_path / "bad.bin"
    np.zeros(nbytes, dtype=np.uint8).tofile(src)
    proc = subprocess.run([str(tool()), type_name, str(cols), str(src), str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    return proc.stderr


def test_tool_rejects_bad_shapes(tmp_path: Path) -> None:
    assert "multiple" in rejects("Q4_K", 640, 144 * 5, tmp_path)  # not whole super-blocks
    assert "whole rows" in rejects("Q6_K", 256, 211, tmp_path)
    assert "unknown type" in rejects("IQ2_XXS", 256, 66, tmp_path)


# --- a real model file: the tensor table read straight from the GGUF header ---

_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_tensors(path: Path) -> tuple[dict[str, tuple[int, list[int], int]], int]:
    """{name: (ggml type id, dims, offset)} and the data section's start."""
    with open(path, "rb") as f:
        buf = f.read(64 << 20)  # the header (262k-token vocabulary included) fits easily
    pos = 0

    def take(fmt: str):
        nonlocal pos
        vals = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return vals if len(vals) > 1 else vals[0]

    def string() -> str:
        nonlocal pos
        n = take("Q")
        s = buf[pos:pos + n].decode("utf-8", "replace")
        pos += n
        return s

    def skip_value(vtype: int):
        nonlocal pos
        if vtype == 8:
            return string()
        if vtype == 9:
            etype, count = take("I"), take("Q")
            if etype in _SCALAR_SIZES:
                pos += _SCALAR_SIZES[etype] * count
            else:
                for _ in range(count):
                    skip_value(etype)
            return None
        size = _SCALAR_SIZES[vtype]
        value = buf[pos:pos + size]
        pos += size
        return int.from_bytes(value, "little")

    assert buf[:4] == b"GGUF", f"{path} is not a GGUF file"
    pos = 4
    _version, n_tensors, n_kv = take("I"), take("Q"), take("Q")
    alignment = 32
    for _ in range(n_kv):
        key, vtype = string(), take("I")
        value = skip_value(vtype)
        if key == "general.alignment":
            alignment = int(value)
    tensors = {}
    for _ in range(n_tensors):
        name = string()
        dims = [take("Q") for _ in range(take("I"))]
        tensors[name] = (take("I"), dims, take("Q"))
    return tensors, (pos + alignment - 1) // alignment * alignment


def test_gemma_tensors(tmp_path: Path) -> None:
    if not GEMMA.exists():
        pytest.fail(f"{GEMMA} is missing: fetch it with `scripts/fetch_model.sh gemma3-270m`")
    tensors, data_start = gguf_tensors(GEMMA)
    seen: dict[str, str] = {}
    for name, (type_id, dims, offset) in sorted(tensors.items()):
        type_name = QT(type_id).name
        if type_name not in LAYOUTS or type_name in seen:
            continue
        seen[type_name] = name
        elems, nbytes, _ = LAYOUTS[type_name]
        cols, rows = dims[0], min(dims[1], 128)
        row_bytes = cols // elems * nbytes
        raw = np.fromfile(GEMMA, dtype=np.uint8, count=rows * row_bytes,
                          offset=data_start + offset).reshape(rows, row_bytes)
        assert_bits_equal(ours(raw, type_name, cols, tmp_path),
                          quants.dequantize(raw, QT[type_name]), f"{name} ({type_name})")
    assert set(seen) >= {"Q8_0", "Q5_0", "Q4_K", "Q6_K"}, seen
