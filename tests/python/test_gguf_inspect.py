"""`cortexstream inspect --json` against the reference GGUF implementation (the `gguf` PyPI package).

A file written with gguf.GGUFWriter must read back exactly (every metadata type, nested arrays,
tensors of supported and unsupported types, a custom alignment); the default model must match what
gguf.GGUFReader sees. The binary comes from $CORTEXSTREAM_BIN (default build/src/cli/cortexstream).
"""
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

import gguf  # pip install -r tests/python/requirements.txt
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("CORTEXSTREAM_BIN", ROOT / "build" / "src" / "cli" / "cortexstream"))
MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"

TYPE_NAMES = {
    VT.UINT8: "uint8", VT.INT8: "int8", VT.UINT16: "uint16", VT.INT16: "int16",
    VT.UINT32: "uint32", VT.INT32: "int32", VT.FLOAT32: "float32", VT.BOOL: "bool",
    VT.STRING: "string", VT.ARRAY: "array", VT.UINT64: "uint64", VT.INT64: "int64",
    VT.FLOAT64: "float64",
}


def run_inspect(path, *extra, check=True):
    if not BIN.exists():
        pytest.fail(f"{BIN} not found: build it (scripts/build.sh) or set CORTEXSTREAM_BIN")
    proc = subprocess.run([str(BIN), "inspect", str(path), *extra], capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def inspect_json(path, *extra):
    return json.loads(run_inspect(path, "--json", *extra).stdout)


def same_scalar(vtype, got, want):
    if vtype == VT.FLOAT32:
        return np.float32(got) == np.float32(want)
    if vtype == VT.FLOAT64:
        return float(got) == float(want)
    return got == want


# ---- a file written here ------------------------------------------------------------------------

SCALARS = [  # key, GGUF type, value
    ("t.u8", VT.UINT8, 200),
    ("t.i8", VT.INT8, -100),
    ("t.u16", VT.UINT16, 60000),
    ("t.i16", VT.INT16, -30000),
    ("t.u32", VT.UINT32, 4_000_000_000),
    ("t.i32", VT.INT32, -2_000_000_000),
    ("t.f32", VT.FLOAT32, 0.1),
    ("t.bool", VT.BOOL, True),
    ("t.str", VT.STRING, "h\u00e9llo \U0001f600 \"quoted\"\n"),
    ("t.u64", VT.UINT64, 18_000_000_000_000_000_000),
    ("t.i64", VT.INT64, -9_000_000_000_000_000_000),
    ("t.f64", VT.FLOAT64, 1e-300),
]
ARRAYS = [  # key, element type, items
    ("t.arr.u8", VT.UINT8, [0, 1, 255]),
    ("t.arr.i16", VT.INT16, [-1, 2]),
    ("t.arr.u64", VT.UINT64, [2**64 - 1]),
    ("t.arr.f32", VT.FLOAT32, [1.5, -0.25, 3.0e-8]),
    ("t.arr.f64", VT.FLOAT64, [2.5]),
    ("t.arr.bool", VT.BOOL, [True, False, True]),
    ("t.arr.str", VT.STRING, ["a", "", "ccc", "\u00e9"]),
    ("t.arr.i32.long", VT.INT32, list(range(-10, 40))),
]
NESTED = [[1, 2, 3], [4], [5, 6]]  # array of arrays of int32


def tensors_to_write(rng):
    """name -> (numpy array to write, raw dtype or None, ggml ne order dims, type name)."""
    out = {}
    f32 = rng.standard_normal((3, 64)).astype(np.float32)
    out["f32.mat"] = (f32, None, [64, 3], "F32")
    out["f16.vec"] = (rng.standard_normal(32).astype(np.float16), None, [32], "F16")
    bf16 = (rng.standard_normal((2, 32)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    out["bf16.mat"] = (bf16, QT.BF16, [32, 2], "BF16")
    for qt in (QT.Q8_0, QT.Q4_0, QT.Q4_1):
        q = gguf.quants.quantize(rng.standard_normal((4, 64)).astype(np.float32), qt)
        out[f"{qt.name.lower()}.mat"] = (q, qt, [64, 4], qt.name)
    # IQ4_NL is not supported by CortexStream: reported, not rejected, by inspect.
    out["blk.0.ffn_up.weight"] = (rng.integers(0, 256, (2, 144), dtype=np.uint8), QT.IQ4_NL,
                                  [256, 2], "IQ4_NL")
    return out


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "written.gguf"
    rng = np.random.default_rng(7)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_custom_alignment(64)
    for key, vtype, value in SCALARS:
        w.add_key_value(key, value, vtype)
    for key, etype, items in ARRAYS:
        w.add_key_value(key, items, VT.ARRAY, sub_type=etype)
    w.add_key_value("t.arr.nested", NESTED, VT.ARRAY)
    tensors = tensors_to_write(rng)
    for name, (data, raw_dtype, _, _) in tensors.items():
        w.add_tensor(name, data, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, tensors


def test_written_file_metadata_reads_back_exactly(written):
    path, _ = written
    j = inspect_json(path, "--max-items", "0")
    assert j["version"] == 3
    assert j["alignment"] == 64
    assert j["file_size"] == path.stat().st_size
    meta = j["metadata"]
    assert meta["general.architecture"] == {"type": "string", "value": "llama"}
    assert meta["general.alignment"] == {"type": "uint32", "value": 64}
    for key, vtype, value in SCALARS:
        assert meta[key]["type"] == TYPE_NAMES[vtype], key
        assert same_scalar(vtype, meta[key]["value"], value), (key, meta[key], value)
    for key, etype, items in ARRAYS:
        got = meta[key]
        assert (got["type"], got["element_type"], got["count"]) == \
            ("array", TYPE_NAMES[etype], len(items)), key
        assert got["truncated"] is False
        assert len(got["items"]) == len(items)
        assert all(same_scalar(etype, g, w) for g, w in zip(got["items"], items)), (key, got)
    nested = meta["t.arr.nested"]
    assert (nested["element_type"], nested["count"]) == ("array", 3)
    assert [inner["items"] for inner in nested["items"]] == NESTED
    assert all(inner["element_type"] == "int32" for inner in nested["items"])
    # the file's keys, in file order, and nothing else
    assert list(meta) == (["general.architecture", "general.alignment"] +
                          [k for k, _, _ in SCALARS] + [k for k, _, _ in ARRAYS] + ["t.arr.nested"])


def test_long_arrays_are_summarised_by_default(written):
    path, _ = written
    got = inspect_json(path)["metadata"]["t.arr.i32.long"]
    assert got["count"] == 50
    assert got["items"] == list(range(-10, -2))
    assert got["truncated"] is True


def test_written_file_tensor_table(written):
    path, tensors = written
    j = inspect_json(path)
    reader = gguf.GGUFReader(str(path))
    by_name = {t.name: t for t in reader.tensors}
    assert [t["name"] for t in j["tensors"]] == list(tensors)
    for t in j["tensors"]:
        data, _, dims, type_name = tensors[t["name"]]
        assert t["type"] == type_name
        assert t["shape"] == dims
        assert t["elements"] == int(np.prod(dims))
        assert t["bytes"] == data.nbytes
        assert t["offset"] % 64 == 0
        assert j["data_offset"] + t["offset"] == by_name[t["name"]].data_offset
        assert t["supported"] == (type_name != "IQ4_NL")
    assert j["unsupported_tensors"] == ["blk.0.ffn_up.weight"]
    totals = j["totals"]
    assert totals["tensors"] == len(tensors)
    assert totals["bytes"] == sum(d.nbytes for d, _, _, _ in tensors.values())
    assert totals["by_type"]["IQ4_NL"] == {"tensors": 1, "bytes": 288}
    assert j["architecture"] == {"name": "llama", "supported": True}


def test_text_output_lists_metadata_tensors_and_totals(written):
    path, tensors = written
    out = run_inspect(path).stdout
    assert "GGUF v3" in out
    assert "t.arr.i32.long" in out and "42 more" in out
    for name in tensors:
        assert name in out
    assert "(unsupported)" in out
    assert f"totals: {len(tensors)} tensors" in out
    assert "architecture 'llama' is supported" in out


def test_unsupported_architecture_is_reported(tmp_path):
    path = tmp_path / "mamba.gguf"
    w = gguf.GGUFWriter(str(path), "mamba")
    w.add_tensor("x.weight", np.zeros(32, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert inspect_json(path)["architecture"] == {"name": "mamba", "supported": False}
    assert "architecture 'mamba' is not supported yet (supported: llama, qwen2, qwen3, gemma3)" \
        in run_inspect(path).stdout


def test_corrupt_file_fails_with_a_clear_message(written, tmp_path):
    path, _ = written
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    # note: GGUFWriter pads after the last tensor, so cut inside that tensor's data.
    end = max(int(t.data_offset) + int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors)
    cut.write_bytes(data[:end - 1])
    proc = run_inspect(cut, check=False)
    assert proc.returncode == 1
    assert str(cut) in proc.stderr and "outside" in proc.stderr, proc.stderr
    missing = run_inspect(tmp_path / "missing.gguf", check=False)
    assert missing.returncode == 1 and "cannot open" in missing.stderr


# ---- the default model against gguf.GGUFReader ------------------------------------------------


def reader_value(field):
    main = field.types[0]
    if main == VT.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    if main != VT.ARRAY:
        return field.parts[field.data[0]].tolist()[0]
    if field.types[-1] == VT.STRING:
        return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
    return [field.parts[i].tolist()[0] for i in field.data]


def test_default_model_matches_gguf_reader():
    if not MODEL.exists():
        pytest.fail(f"{MODEL} missing: run scripts/fetch_model.sh")
    j = inspect_json(MODEL, "--max-items", "0")
    reader = gguf.GGUFReader(str(MODEL))
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert j["version"] == reader.fields["GGUF.version"].parts[-1][0]
    assert list(j["metadata"]) == list(fields)
    for key, field in fields.items():
        got = j["metadata"][key]
        want = reader_value(field)
        assert got["type"] == TYPE_NAMES[VT(field.types[0])], key
        if field.types[0] == VT.ARRAY:
            etype = VT(field.types[-1])
            assert got["element_type"] == TYPE_NAMES[etype], key
            assert got["count"] == len(want), key
            assert len(got["items"]) == len(want), key
            assert all(same_scalar(etype, g, w) for g, w in zip(got["items"], want)), key
        else:
            assert same_scalar(VT(field.types[0]), got["value"], want), (key, got, want)

    assert len(j["tensors"]) == len(reader.tensors) == 272
    for t, r in zip(j["tensors"], reader.tensors):
        assert t["name"] == r.name
        assert t["type"] == r.tensor_type.name
        assert t["shape"] == [int(d) for d in r.shape]
        assert t["elements"] == int(r.n_elements)
        assert t["bytes"] == int(r.n_bytes)
        assert j["data_offset"] + t["offset"] == r.data_offset
    assert j["unsupported_tensors"] == []
    assert j["totals"]["bytes"] == sum(int(r.n_bytes) for r in reader.tensors)
    assert j["data_offset"] + j["totals"]["bytes"] == MODEL.stat().st_size
