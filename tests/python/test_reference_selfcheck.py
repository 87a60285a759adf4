"""Self-checks of the float64 NumPy reference (tests/python/reference), before it is used as an
oracle for the C++ engine.

Run from the repo root:  python3 -m pytest -q -s tests/python/test_reference_selfcheck.py
"""

from __future__ import annotations

import os

# Single-threaded BLAS: on the shared 2-core machine, multi-threaded OpenBLAS under load is several
# times slower in wall time for these small float64 products (set before numpy is first imported).
for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from reference.llama_ref import LlamaRef, read_tensor, rms_norm, rope, KVCache  # noqa: E402
from reference.tiny_model import QTYPES, quantize, write_tiny_model  # noqa: E402
from reference.tiny_arch_model import write_tiny_arch_model  # noqa: E402

REPO = HERE.parent.parent
DEFAULT_MODEL = Path(os.environ.get("CORTEX_TEST_MODEL", REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))

# "The capital of France is" in SmolLM2's vocabulary, looked up once by string in
# tokenizer.ggml.tokens ('Ġ' marks a leading space): The, Ġcapital, Ġof, ĠFrance, Ġis
FRANCE_PROMPT = [504, 3575, 282, 4649, 314]
TOKEN_PARIS = 7042  # "ĠParis"

TINY_VARIANTS = [
    # (weight_type, tied)
    ("F32", False), ("F32", True), ("F16", False), ("BF16", True),
    ("Q8_0", False), ("Q4_0", True), ("Q4_1", False), ("Q4_1", True),
]


def _gguf_dequant(t) -> np.ndarray:
    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float64)


def _assert_dequant_matches(reader, weights=None) -> int:
    n = 0
    for t in reader.tensors:
        mine = weights[t.name] if weights is not None else read_tensor(reader, t)
        ref = _gguf_dequant(t).reshape(mine.shape)
        assert mine.shape == tuple(int(d) for d in reversed(list(t.shape))), t.name
        # gguf computes in float32 (d*q + m is rounded once more than in float64)
        if not np.all(np.abs(mine - ref) <= 2e-7 * np.abs(ref)):
            np.testing.assert_allclose(mine, ref, rtol=2e-7, atol=0, err_msg=t.name)
        n += 1
    return n


# ----------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_models")


@pytest.fixture(scope="module", params=TINY_VARIANTS, ids=[f"{w}{'-tied' if t else ''}" for w, t in TINY_VARIANTS])
def tiny_path(request, tiny_dir):
    wt, tied = request.param
    p = tiny_dir / f"tiny_{wt}_{'tied' if tied else 'out'}.gguf"
    if not p.exists():
        write_tiny_model(str(p), seed=7, weight_type=wt, tied=tied)
    return p


@pytest.fixture(scope="module")
def default_reader():
    if not DEFAULT_MODEL.exists():
        pytest.skip(f"default model {DEFAULT_MODEL} absent (fetch it with scripts/fetch_model.sh or set CORTEX_TEST_MODEL)")
    return gguf.GGUFReader(str(DEFAULT_MODEL))


@pytest.fixture(scope="module")
def default_model(default_reader):
    return LlamaRef(str(DEFAULT_MODEL), reader=default_reader)


# ----------------------------------------------------------------------------------------------
# hand-checked building blocks
# ----------------------------------------------------------------------------------------------

def test_rms_norm_hand():
    x = np.array([1.0, -1.0, 1.0, -1.0])
    np.testing.assert_allclose(rms_norm(x, np.array([1.0, 2.0, 3.0, 4.0]), 0.0), [1, -2, 3, -4], rtol=1e-15)
    # mean(x^2) = 1, eps = 1 -> divide by sqrt(2)
    np.testing.assert_allclose(rms_norm(np.ones(4), np.ones(4), 1.0), np.full(4, 1 / np.sqrt(2)), rtol=1e-15)
    # [3, 4]: mean square 12.5
    np.testing.assert_allclose(rms_norm(np.array([[3.0, 4.0]]), np.ones(2), 0.0),
                               [[3 / np.sqrt(12.5), 4 / np.sqrt(12.5)]], rtol=1e-15)


def test_rope_hand():
    # one token, one head, head_dim 6, n_rot 4, base 10000: pair 0 angle pos*1, pair 1 angle pos*0.01,
    # dims 4, 5 untouched.
    x = np.array([[[1.0, 0.0, 0.0, 1.0, 5.0, 6.0]]])
    y = rope(x, np.array([1]), n_rot=4, freq_base=10000.0)
    expect = [np.cos(1.0), np.sin(1.0), -np.sin(0.01), np.cos(0.01), 5.0, 6.0]
    np.testing.assert_allclose(y[0, 0], expect, rtol=1e-15, atol=1e-15)
    # position 0 is the identity; position 3 rotates by 3 * angle
    np.testing.assert_allclose(rope(x, np.array([0]), 4, 10000.0), x, rtol=0, atol=0)
    y3 = rope(np.array([[[2.0, 1.0, 0, 0]]]), np.array([3]), 4, 10000.0)
    np.testing.assert_allclose(y3[0, 0, :2], [2 * np.cos(3) - np.sin(3), 2 * np.sin(3) + np.cos(3)], rtol=1e-14)
    # relative-position property: <rope(q, m), rope(k, n)> depends only on m - n
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((2, 1, 1, 16))
    d1 = np.sum(rope(q, np.array([7]), 16, 100.0) * rope(k, np.array([3]), 16, 100.0))
    d2 = np.sum(rope(q, np.array([104]), 16, 100.0) * rope(k, np.array([100]), 16, 100.0))
    assert abs(d1 - d2) < 1e-12


# ----------------------------------------------------------------------------------------------
# dequantization cross-validation against gguf's own helpers
# ----------------------------------------------------------------------------------------------

def test_quantizer_bytes_match_gguf():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((8, 128)).astype(np.float32)
    w[0, :32] = 0.0  # all-zero block
    for name in ("Q8_0", "Q4_0", "Q4_1", "BF16"):
        mine = quantize(w, name).reshape(-1)
        ref = np.asarray(gguf.quants.quantize(w, QTYPES[name])).reshape(-1).view(np.uint8)
        np.testing.assert_array_equal(mine, ref, err_msg=name)


def test_tiny_dequant_matches_gguf(tiny_path):
    r = gguf.GGUFReader(str(tiny_path))
    assert _assert_dequant_matches(r) == 2 + 2 * 9 + (0 if "tied" in tiny_path.name else 1)


def test_default_dequant_matches_gguf(default_reader, default_model):
    # LlamaRef's weights were dequantized by reference.llama_ref.read_tensor from the raw file bytes
    n = _assert_dequant_matches(default_reader, default_model.weights)
    types = {t.tensor_type.name for t in default_reader.tensors}
    print(f"\n{DEFAULT_MODEL.name}: {n} tensors, types {sorted(types)} match gguf.quants.dequantize")


# ----------------------------------------------------------------------------------------------
# forward pass
# ----------------------------------------------------------------------------------------------

def _naive_logits(m: LlamaRef, tokens) -> np.ndarray:
    """Scalar-loop (per token, per head) forward, written separately from LlamaRef.forward."""
    T = len(tokens)
    hd = m.head_dim
    group = m.n_head // m.n_head_kv
    x = [m.tok_embd[t].copy() for t in tokens]

    def norm(v, w):
        return v / np.sqrt(np.dot(v, v) / v.size + m.eps) * w

    def rot(v, pos):
        v = v.copy()
        for i in range(m.n_rot // 2):
            a = pos * m.freq_base ** (-2.0 * i / m.n_rot)
            v0, v1 = v[2 * i], v[2 * i + 1]
            v[2 * i], v[2 * i + 1] = v0 * np.cos(a) - v1 * np.sin(a), v0 * np.sin(a) + v1 * np.cos(a)
        return v

    for L in m.layers:
        qs, ks, vs = [], [], []
        for p in range(T):
            h = norm(x[p], L["attn_norm"])
            q, k, v = L["attn_q"] @ h, L["attn_k"] @ h, L["attn_v"] @ h
            qs.append([rot(q[j * hd:(j + 1) * hd], p) for j in range(m.n_head)])
            ks.append([rot(k[j * hd:(j + 1) * hd], p) for j in range(m.n_head_kv)])
            vs.append([v[j * hd:(j + 1) * hd] for j in range(m.n_head_kv)])
        for p in range(T):
            heads = []
            for j in range(m.n_head):
                kv = j // group
                s = np.array([np.dot(qs[p][j], ks[u][kv]) / np.sqrt(hd) for u in range(p + 1)])
                e = np.exp(s - s.max())
                e /= e.sum()
                heads.append(sum(e[u] * vs[u][kv] for u in range(p + 1)))
            x[p] = x[p] + L["attn_output"] @ np.concatenate(heads)
            h = norm(x[p], L["ffn_norm"])
            g, up = L["ffn_gate"] @ h, L["ffn_up"] @ h
            x[p] = x[p] + L["ffn_down"] @ (g / (1 + np.exp(-g)) * up)
    return np.stack([m.output @ norm(v, m.output_norm) for v in x])


def test_tiny_forward_matches_naive_loop(tiny_path):
    m = LlamaRef(str(tiny_path))
    assert m.tied == ("tied" in tiny_path.name)
    toks = [1, 60, 80, 100, 270, 5, 7]
    np.testing.assert_allclose(m.logits(toks), _naive_logits(m, toks), rtol=1e-10, atol=1e-10)


def test_tiny_incremental_equals_full(tiny_path):
    m = LlamaRef(str(tiny_path))
    prompt = [1, 3 + ord("H"), 3 + ord("i"), 50]
    n = 12
    gen, step_logits = m.greedy(prompt, n, return_logits=True)
    full = m.logits(prompt + gen[:-1])
    assert np.argmax(full[len(prompt) - 1:], axis=1).tolist() == gen
    np.testing.assert_allclose(np.stack(step_logits), full[len(prompt) - 1:], rtol=1e-10, atol=1e-10)
    # chunked prefill through the cache equals one-shot prefill
    cache = KVCache(m.n_layer)
    a = m.forward(prompt[:2], cache)
    b = m.forward(prompt[2:], cache)
    np.testing.assert_allclose(np.concatenate([a, b]), m.logits(prompt), rtol=1e-10, atol=1e-10)


def test_tiny_cli(tiny_dir, tmp_path):
    p = tiny_dir / "tiny_cli.gguf"
    write_tiny_model(str(p), seed=11, weight_type="Q8_0")
    out = tmp_path / "logits.npy"
    r = subprocess.run([sys.executable, "-m", "reference.llama_ref", str(p), "--tokens", "1,2,3",
                        "--out", str(out), "--greedy", "3"], cwd=HERE, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lg = np.load(out)
    assert lg.shape == (3, 300) and lg.dtype == np.float64
    np.testing.assert_array_equal(lg, LlamaRef(str(p)).logits([1, 2, 3]))
    assert "greedy:" in r.stdout


def test_default_model_greedy_is_sensible(default_model, default_reader):
    m = default_model
    assert (m.n_layer, m.n_embd, m.n_head, m.n_head_kv, m.n_vocab) == (30, 576, 9, 3, 49152)
    assert m.tied
    gen = m.greedy(FRANCE_PROMPT, 8)
    full = m.logits(FRANCE_PROMPT + gen[:-1])
    assert np.argmax(full[len(FRANCE_PROMPT) - 1:], axis=1).tolist() == gen
    vocab = default_reader.fields["tokenizer.ggml.tokens"].contents()
    text = "".join(vocab[t] for t in gen).replace("Ġ", " ").replace("Ċ", "\n")
    print(f"\nThe capital of France is|{text!r}  ids={gen}")
    assert gen[0] == TOKEN_PARIS, text


# ----------------------------------------------------------------------------------------------
# architectures beyond llama (qwen2, qwen3, gemma3), Llama 3 RoPE factors, Q5/K-quant weights
# ----------------------------------------------------------------------------------------------

import hashlib  # noqa: E402
import json  # noqa: E402

from reference.llama_ref import attention_mask, gelu_tanh, swa_layer_pattern  # noqa: E402
from reference.tiny_arch_model import (RANDOM_BLOCK_TYPES, llama3_rope_factors,  # noqa: E402
                                       random_quant_matrix, set_block_scales)

ARCH_FIXTURE = HERE / "data" / "arch_llamacpp_fixture.json"
GEMMA_MODEL = REPO / "models" / "gemma-3-270m-q4_k_m.gguf"


def test_rope_neox_hand():
    # head_dim 4, NEOX: pairs (0, 2) and (1, 3); angles pos*1 and pos*base^(-1/2)
    x = np.array([[[1.0, 0.0, 0.0, 1.0]]])
    y = rope(x, np.array([2]), 4, 100.0, neox=True)
    a0, a1 = 2.0, 2.0 / 10.0
    np.testing.assert_allclose(y[0, 0], [np.cos(a0), -np.sin(a1), np.sin(a0), np.cos(a1)], atol=1e-15)
    # freq_scale multiplies every angle, freq_factors divide them pair by pair
    z = rope(x, np.array([2]), 4, 100.0, neox=True, freq_scale=0.5, freq_factors=np.array([1.0, 4.0]))
    b0, b1 = 1.0, 2.0 / 10.0 * 0.5 / 4.0
    np.testing.assert_allclose(z[0, 0], [np.cos(b0), -np.sin(b1), np.sin(b0), np.cos(b1)], atol=1e-15)


def test_sliding_window_mask_and_pattern_hand():
    m = attention_mask(np.array([0, 5, 9]), np.arange(10), n_swa=3)
    assert [list(np.flatnonzero(~row)) for row in m] == [[0], [3, 4, 5], [7, 8, 9]]
    assert [list(np.flatnonzero(~row)) for row in attention_mask(np.array([2]), np.arange(4))] == [[0, 1, 2]]
    assert swa_layer_pattern(13, 6) == [True] * 5 + [False] + [True] * 5 + [False] + [True]
    assert swa_layer_pattern(3, 0) == [True] * 3


def test_gelu_tanh_hand():
    np.testing.assert_allclose(gelu_tanh(np.array([0.0, 1.0, -1.0, 3.0])),
                               [0.0, 0.8411919906082768, -0.1588080093917233, 2.996362607918227], rtol=1e-14)


def test_llama3_rope_factors_hand():
    f = llama3_rope_factors(64, 10000.0, factor=8.0, low=1.0, high=4.0, orig_ctx=32)
    wl = 2 * np.pi * 10000.0 ** (np.arange(32) * 2 / 64)
    assert np.all(f[wl < 8] == 1) and np.all(f[wl > 32] == 8)
    mid = (wl >= 8) & (wl <= 32)
    assert mid.any() and np.all((f[mid] >= 1) & (f[mid] <= 8))


@pytest.mark.parametrize("name", RANDOM_BLOCK_TYPES)
def test_random_block_scale_fields(name):
    """The fp16 fields the tiny writer sets are the blocks' scales: zero scales give an all-zero
    matrix, doubled scales a doubled one (through gguf.quants, the reference's dequantizer)."""
    rng = np.random.default_rng(0)
    raw = random_quant_matrix(rng, 4, 256, name, 0.1)
    qt = gguf.GGMLQuantizationType[name]
    deq = gguf.quants.dequantize(raw, qt).astype(np.float64)
    assert abs(np.std(deq) - 0.1) < 0.02
    blocks = raw.reshape(-1, raw.shape[1] // (256 // gguf.constants.GGML_QUANT_SIZES[qt][0]))
    d = np.ascontiguousarray(blocks[:, [SCALE_OFF[name], SCALE_OFF[name] + 1]]).view("<f2").astype(np.float64)[:, 0]
    for mult, expect in [(0.0, 0.0 * deq), (2.0, 2.0 * deq)]:
        b = blocks.copy()
        set_block_scales(b, name, d * mult)
        # atol: the min field is rounded to fp16 on its own, and x = d*sc*q - dmin*m cancels
        np.testing.assert_allclose(gguf.quants.dequantize(b.reshape(raw.shape), qt), expect, rtol=0, atol=2e-3)


SCALE_OFF = {"Q5_0": 0, "Q5_1": 0, "Q2_K": 80, "Q3_K": 108, "Q4_K": 0, "Q5_K": 0, "Q6_K": 208}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x)
    return x - m - np.log(np.sum(np.exp(x - m)))


def _compare_with_llamacpp(m: LlamaRef, ids: list[int], rec: dict, tol: float) -> float:
    """Max |logprob| difference over llama.cpp's recorded top-5 of every decode step, following
    llama.cpp's greedy tokens (teacher-forced); the reference's own greedy choice must equal
    llama.cpp's wherever its top-2 margin exceeds 2 * tol."""
    greedy = rec["greedy"]
    full = m.logits(ids + greedy[:-1])[len(ids) - 1:]
    err = 0.0
    for step, (row, tok) in enumerate(zip(full, greedy)):
        lp = _log_softmax(row)
        top2 = np.sort(lp)[-2:]
        if top2[1] - top2[0] > 2 * tol:
            assert int(np.argmax(lp)) == tok, f"step {step}: reference {int(np.argmax(lp))}, llama.cpp {tok}"
        for tid, val in rec["top_logprobs"][step] or []:
            err = max(err, abs(lp[tid] - val))
    return err


def _arch_fixture() -> dict:
    return json.loads(ARCH_FIXTURE.read_text())


def _tiny_fixture_ids() -> list[str]:
    return [e["id"] for e in _arch_fixture()["tiny"]]


@pytest.mark.parametrize("case", _tiny_fixture_ids())
def test_tiny_architectures_match_llamacpp(tmp_path, case):
    """The reference on each tiny architecture model against llama.cpp's recorded log-probs
    (tests/python/data/arch_llamacpp_fixture.json, see reference.make_arch_llamacpp_fixture).

    Tolerance: 5e-3 nats with F32 weights (llama.cpp differs from float64 only by float32 sums and
    its GELU tabulated at fp16 inputs; measured 1e-5 for llama/qwen2/qwen3, 1e-3 for gemma3).
    With quantized weights llama.cpp also rounds every matmul's activations to 8 bits per block,
    which on these random models moves the top-5 log-probs by up to ~0.5 nats (measured the same
    for Q8_0, whose dequantization is verified exactly above, as for the K-quants: 0.1..0.5), so
    the bound there is 1 nat: it still catches a wrong block layout (scrambled weights change the
    distribution entirely). Each of the mistakes the reference guards against moves the F32
    log-probs by 2..5 nats on the gemma3 model (window 7 or 9 instead of 8, no window,
    sliding-window layers on the global base, scale 1/sqrt(64) instead of 1/sqrt(128), normal
    instead of NEOX RoPE)."""
    fx = _arch_fixture()
    e = next(x for x in fx["tiny"] if x["id"] == case)
    path = tmp_path / f"{case}.gguf"
    write_tiny_arch_model(str(path), e["arch"], seed=fx["tiny_seed"], weight_type=e["weight_type"], **e["kwargs"])
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest == e["sha256"], ("the tiny model writer no longer reproduces the recorded file: "
                                   "re-record with python3 -m reference.make_arch_llamacpp_fixture")
    m = LlamaRef(str(path))
    tol = 5e-3 if e["weight_type"] == "F32" else 1.0
    err = _compare_with_llamacpp(m, fx["tiny_prompt"], e, tol)
    print(f"\n{case}: max |logprob - llama.cpp| {err:.2e}")
    assert err < tol


def test_gemma3_270m_matches_llamacpp():
    """Gemma 3 270M Q4_K_M (18 layers; 5, 11, 17 global): reference vs llama.cpp's recorded
    log-probs on two prompts tokenized by llama.cpp (which gives the same ids for the first as
    test_architectures.GEMMA_IDS). Tolerance 0.5 nats (measured 0.25): llama.cpp rounds
    activations to 8 bits for every quantized matmul over 18 layers and evaluates GELU at fp16;
    the greedy tokens must agree wherever the reference's top-2 margin exceeds 1 nat."""
    if not GEMMA_MODEL.exists():
        pytest.fail(f"{GEMMA_MODEL} missing: run scripts/fetch_model.sh gemma3-270m")
    g = _arch_fixture()["gemma"]
    assert g and g["file"] == GEMMA_MODEL.name
    m = LlamaRef(str(GEMMA_MODEL))
    assert m.swa_layers == [i % 6 < 5 for i in range(18)] and m.n_swa == 512
    assert (m.freq_base, m.freq_base_swa, m.attn_scale) == (1e6, 1e4, 1 / 16)
    for p in g["prompts"]:
        err = _compare_with_llamacpp(m, p["ids"], p, 0.5)
        print(f"\n{p['text']!r}: max |logprob - llama.cpp| {err:.3f}")
        assert err < 0.5
