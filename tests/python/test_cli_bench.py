"""`cortexstream bench kv` and `bench kv-sim` print one JSON object with the promised fields."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

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
