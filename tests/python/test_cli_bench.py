"""`cortexstream bench kv`, `bench kv-sim` and `bench batched` print one JSON object with the
promised fields."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent.parent
BIN = Path(os.environ.get("CORTEXSTREAM_BIN", REPO / "build" / "src" / "cli" / "cortexstream"))


def run_json(*args: str) -> dict:
    proc = subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, "--json prints one line"
    return json.loads(lines[0])


def test_bench_kv_fields():
    out = run_json("bench", "kv", "--json")
    for key in ("allocate_free_ns_per_block", "append_ns_per_token", "fork_ns", "view_ns"):
        assert out[key] > 0, key


def test_bench_kv_sim_paged_beats_contiguous():
    out = run_json("bench", "kv-sim", "--json", "--requests", "500")
    for design in ("paged", "contiguous"):
        for key in ("mean_utilization", "p50_utilization", "peak_sequences", "rejected", "delayed"):
            assert key in out[design], (design, key)
    assert out["paged"]["mean_utilization"] > 0.95
    assert out["paged"]["mean_utilization"] > out["contiguous"]["mean_utilization"]
    assert out["paged"]["completed"] + out["paged"]["rejected"] == 500


def test_bad_option_is_a_clear_error():
    proc = subprocess.run([str(BIN), "bench", "kv-sim", "--block-size", "0"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0
    assert "block-size" in proc.stderr


DEFAULT_MODEL = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def bench_model(tmp_path_factory) -> Path:
    """The default model when it is there, else a tiny random one (tests/python/reference)."""
    if DEFAULT_MODEL.exists():
        return DEFAULT_MODEL
    pytest.importorskip("gguf")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from reference.tiny_model import write_tiny_model  # noqa: PLC0415
    path = tmp_path_factory.mktemp("bench_batched") / "tiny.gguf"
    write_tiny_model(str(path), seed=1)
    return path


def test_bench_batched_fields(bench_model):
    npp, ntg = 8, 4
    out = run_json("bench", "batched", "--json", "--model", str(bench_model), "--npl", "1,2",
                   "--npp", str(npp), "--ntg", str(ntg), "--threads", "2", "--repeats", "2")
    assert out["bench"] == "batched"
    assert out["machine"]["cpu"] and out["machine"]["cores"] >= 1
    assert out["threads"] == 2
    assert (out["npp"], out["ntg"], out["repeats"]) == (npp, ntg, 2)
    assert out["model"] == str(bench_model)
    assert [r["n"] for r in out["results"]] == [1, 2]
    for r in out["results"]:
        n = r["n"]
        cfg = r["engine_config"]
        assert cfg["max_num_seqs"] == n and cfg["max_batched_tokens"] == n * npp
        assert cfg["kv_blocks"] > cfg["kv_blocks_needed"] >= n
        assert r["all_sequences_together"] is True
        assert r["peak_step_sequences"] == n and r["preemptions"] == 0
        assert (r["prefill_steps"], r["decode_steps"]) == (1, ntg - 1)
        assert (r["prefill_tokens"], r["decode_tokens"]) == (n * npp, n * (ntg - 1))
        assert len(r["runs"]) == 2
        for run in r["runs"]:
            assert run["prefill_s"] > 0 and run["decode_s"] > 0
            assert run["total_s"] == pytest.approx(run["prefill_s"] + run["decode_s"], rel=1e-6)
        assert r["prefill_s"] == min(run["prefill_s"] for run in r["runs"])
        assert r["decode_s"] == min(run["decode_s"] for run in r["runs"])
        assert r["prefill_tokens_per_s"] == pytest.approx(n * npp / r["prefill_s"])
        assert r["decode_tokens_per_s"] == pytest.approx(n * (ntg - 1) / r["decode_s"])
        assert r["total_tokens_per_s"] == pytest.approx(n * (npp + ntg) / r["total_s"])
        assert 0 < r["total_s"] < 60


def test_bench_batched_needs_two_generated_tokens():
    proc = subprocess.run([str(BIN), "bench", "batched", "--ntg", "1"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0
    assert "ntg" in proc.stderr
