"""The C++ forward pass of the architectures llama (Llama 3 RoPE factors, linear RoPE scaling),
qwen2, qwen3 and gemma3, in every weight type (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K,
Q3_K, Q4_K, Q5_K, Q6_K), against the independent float64 reference (reference.llama_ref.LlamaRef).

Models: tiny random GGUFs from reference.tiny_arch_model (hidden 256, ffn 512, vocab 300; gemma3
has 6 layers with a sliding window of 8 tokens, so on the ~77-token prompt used here layers 0-4
see only the last 8 positions and layer 5 sees all of them), plus the real Gemma 3 270M Q4_K_M.

Checks, as in test_forward_reference.py (whose helpers are imported) and test_int8_path.py:
- ``--precision f32 --kv-dtype f32``: every prompt row and every decode row of the dumped logits
  within max |diff| / max |ref| < 1e-3 of the reference, and the 32 greedy tokens identical.
  Justification as there: float32 accumulation over dot products of 256..2048 terms gives
  ~1e-6..1e-5 relative, compounded over at most 18 layers; a real mistake (a RoPE pair layout,
  a window off by one, a base, a scale, a missing norm or bias) moves the logits by O(1)
  (measured with the reference itself against llama.cpp, test_reference_selfcheck.py: 2..5 nats).
- ``--max-batched-tokens 5`` on gemma3: the prompt prefilled in chunks smaller than the window
  gives the same rows (and bit-identical to one chunk).
- ``--precision int8``: mean KL(reference || int8) over the prompt positions < 0.01 nats.

Run from the repo root (needs build/src/cli/cortexstream, or CORTEXSTREAM_BIN):
  python3 -m pytest -q tests/python/test_architectures.py
  python3 -m pytest -q tests/python/test_architectures.py -k gemma3     # one architecture
The real-model test needs models/gemma-3-270m-q4_k_m.gguf (scripts/fetch_model.sh gemma3-270m).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from reference.llama_ref import TYPE_NAMES, LlamaRef  # noqa: E402
from reference.tiny_arch_model import ALL_TYPES, ARCHS, write_tiny_arch_model  # noqa: E402
from test_forward_reference import (BIN, GREEDY_STEPS, REPO, cpp_logits_and_greedy,  # noqa: E402
                                    needs_mlx, reference_rows, rel_error, tokenize)
from test_int8_path import logits_and_tokens, mean_kl  # noqa: E402

GEMMA_MODEL = REPO / "models" / "gemma-3-270m-q4_k_m.gguf"
# "<bos>The capital of France is": ids looked up by string in the file's tokenizer.ggml.tokens
# ('▁' marks a leading space); bos = 2 (the file adds it).
GEMMA_TEXT = "The capital of France is"
GEMMA_IDS = [2, 818, 5279, 529, 7001, 563]

PROMPT = "The quick brown fox jumps over the lazy dog. " * 2     # 77 tokens in the tiny vocabulary

# (case id, arch, weight type, extra writer arguments). Every architecture and every weight type
# appears; the full cross product would take several minutes of reference time.
CASES = [
    ("llama3-F32", "llama", "F32", {}),
    ("llama3-Q8_0", "llama", "Q8_0", {}),
    ("llama3-Q4_K", "llama", "Q4_K", {}),
    ("llama3-Q6_K", "llama", "Q6_K", {}),
    ("llama3-Q5_0", "llama", "Q5_0", {}),
    ("llama-linear4-Q4_0", "llama", "Q4_0", {"rope_freqs": False, "rope_scaling_factor": 4.0}),
    ("qwen2-F16", "qwen2", "F16", {}),
    ("qwen2-Q4_1", "qwen2", "Q4_1", {}),
    ("qwen2-Q5_K", "qwen2", "Q5_K", {}),
    ("qwen2-Q2_K", "qwen2", "Q2_K", {}),
    ("qwen3-BF16", "qwen3", "BF16", {}),
    ("qwen3-Q3_K", "qwen3", "Q3_K", {}),
    ("qwen3-Q5_1", "qwen3", "Q5_1", {}),
    ("gemma3-F32", "gemma3", "F32", {}),
    ("gemma3-Q4_K", "gemma3", "Q4_K", {}),
    ("gemma3-Q6_K-embd-Q8_0", "gemma3", "Q6_K", {"embd_type": "Q8_0"}),
    ("gemma3-Q5_0", "gemma3", "Q5_0", {}),
    ("gemma3-swabase-softcap-Q8_0", "gemma3", "Q8_0",
     {"rope_freq_base_swa": 5000.0, "final_logit_softcapping": 15.0}),
]

INT8_CASES = ["llama3-Q4_K", "llama3-Q8_0", "qwen2-Q5_K", "qwen3-Q3_K", "gemma3-Q4_K",
              "gemma3-Q5_0", "qwen2-Q4_1"]

_CASE = {c[0]: c[1:] for c in CASES}


def test_every_architecture_and_weight_type_is_covered():
    assert {arch for _, arch, _, _ in CASES} == set(ARCHS)
    types = {t for _, _, t, _ in CASES} | {kw.get("embd_type") for _, _, _, kw in CASES} - {None}
    assert types == set(ALL_TYPES), sorted(set(ALL_TYPES) - types)


@pytest.fixture(scope="module", autouse=True)
def need_binary():
    if not BIN.exists():
        pytest.fail(f"{BIN} not built (scripts/build.sh)")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """case id -> (path, LlamaRef), written and loaded once per module."""
    root = tmp_path_factory.mktemp("arch_models")
    cache: dict[str, tuple[Path, LlamaRef]] = {}

    def get(case: str):
        if case not in cache:
            arch, wt, kw = _CASE[case]
            path = root / f"{case}.gguf"
            write_tiny_arch_model(str(path), arch, seed=21, weight_type=wt, **kw)
            cache[case] = (path, LlamaRef(str(path)))
        return cache[case]
    return get


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_tiny_f32_logits_and_greedy(tmp_path, models, case):
    path, ref = models(case)
    assert TYPE_NAMES[ref.tensor_types["blk.0.ffn_down.weight"]] == _CASE[case][1]
    ids = tokenize(path, PROMPT)
    if ref.n_swa:
        assert len(ids) > 4 * ref.n_swa, "the prompt must be long enough for the window to matter"
    logits, greedy = cpp_logits_and_greedy(path, PROMPT, tmp_path)
    expected = reference_rows(ref, ids, greedy)
    assert logits.shape == expected.shape
    err = rel_error(logits, expected)
    print(f"\n{case}: {len(ids)} tokens, relative logit error {err:.2e}")
    assert err < 1e-3, f"{case}: relative logit error {err:.2e}"
    assert greedy == ref.greedy(ids, GREEDY_STEPS), case


def test_gemma3_chunked_prefill_across_the_window(tmp_path, models):
    """Chunks of 5 tokens, smaller than the window of 8: each chunk's queries see keys of the
    previous chunks through the cache, and the window boundary falls inside chunks."""
    path, ref = models("gemma3-F32")
    ids = tokenize(path, PROMPT)
    chunked, greedy = cpp_logits_and_greedy(path, PROMPT, tmp_path, max_batched_tokens=5)
    err = rel_error(chunked, reference_rows(ref, ids, greedy))
    print(f"\ngemma3 chunked prefill: relative logit error {err:.2e}")
    assert err < 1e-3
    whole, greedy_whole = cpp_logits_and_greedy(path, PROMPT, tmp_path)
    assert greedy_whole == greedy
    assert np.array_equal(whole, chunked)


@pytest.mark.parametrize("case", INT8_CASES)
def test_tiny_int8_path_kl(tmp_path, models, case):
    path, ref = models(case)
    ids = tokenize(path, PROMPT)
    logits, _ = logits_and_tokens(path, PROMPT, tmp_path, "int8", 1)
    kl = mean_kl(ref.logits(ids), logits[:len(ids)])
    print(f"\n{case}: mean KL(reference || int8) {kl:.2e}")
    assert kl < 0.01


@pytest.fixture(scope="module")
def gemma_ref():
    if not GEMMA_MODEL.exists():
        pytest.fail(f"{GEMMA_MODEL} missing: run scripts/fetch_model.sh gemma3-270m")
    return LlamaRef(str(GEMMA_MODEL))


def test_gemma3_270m_logits_and_greedy(tmp_path, gemma_ref):
    assert (gemma_ref.arch, gemma_ref.n_layer, gemma_ref.n_swa) == ("gemma3", 18, 512)
    assert [i for i, s in enumerate(gemma_ref.swa_layers) if not s] == [5, 11, 17]
    ids = tokenize(GEMMA_MODEL, GEMMA_TEXT)
    assert ids == GEMMA_IDS
    logits, greedy = cpp_logits_and_greedy(GEMMA_MODEL, GEMMA_TEXT, tmp_path)
    expected = reference_rows(gemma_ref, ids, greedy)
    assert logits.shape == expected.shape
    err = rel_error(logits, expected)
    print(f"\ngemma-3-270m: relative logit error {err:.2e}, greedy {greedy[:8]}")
    assert err < 1e-3
    assert greedy == gemma_ref.greedy(ids, GREEDY_STEPS)


# The MLX backend (builds with CS_WITH_MLX=1) on every case, prefilled 5 tokens a step (so gemma3's
# window of 8 falls inside and across chunks). F32, BF16, Q8_0, Q4_0 and Q4_1 matrices keep their
# exact values on MLX: 1e-3, as above. F16, Q5 and the K-quants are dequantized to float16 there,
# which rounds each weight to 11 significant bits (relative error <= 2^-12 ~ 2.4e-4, random in
# sign, so dot products of 64..256 terms move far less); 5e-3 leaves room for that on top.
# Measured: ~5e-6 for the exact types, 4e-4 ... 2.8e-3 for the float16 ones.
MLX_EXACT_TYPES = {"F32", "BF16", "Q8_0", "Q4_0", "Q4_1"}


@needs_mlx
@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_tiny_mlx_backend_logits_and_greedy(tmp_path, models, case):
    path, ref = models(case)
    ids = tokenize(path, PROMPT)
    logits, greedy = cpp_logits_and_greedy(path, PROMPT, tmp_path, backend="mlx",
                                           max_batched_tokens=5)
    err = rel_error(logits, reference_rows(ref, ids, greedy))
    exact = _CASE[case][1] in MLX_EXACT_TYPES and _CASE[case][2].get("embd_type") is None
    print(f"\nMLX {case}: relative logit error {err:.2e}")
    assert err < (1e-3 if exact else 5e-3), f"{case}: relative logit error {err:.2e}"
    assert greedy == ref.greedy(ids, GREEDY_STEPS), case
