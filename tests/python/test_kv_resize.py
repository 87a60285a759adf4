"""Resizing the KV cache while serving: POST /admin/kv-cache {"bytes": N}.

A server started with a 16-block pool and room to grow (--kv-cache-max-memory) runs eight
streamed greedy requests (~240 tokens, 15 blocks each) at once while the pool is grown, shrunk
below what the requests hold (blocks in use are moved down, the newest requests are preempted and
resume later) and grown again. Every request completes and its text
equals the same request run alone on an unloaded server. Sizes out of range, one too small for a
request already accepted, and malformed bodies are refused with 400 and a message; the endpoint
needs the API key.

Run from the repo root: python3 -m pytest -q tests/python/test_kv_resize.py
"""
from __future__ import annotations

import json
import threading
import time

from test_server import PROMPTS, Server, curl, run_streams

BLOCK = 368640  # bytes of one block: 16 tokens x 30 layers x 3 KV heads x 64 x 2 (K, V) x 2 bytes
REQUESTS = [{"prompt": (p + " ") * 6, "max_tokens": 200, "temperature": 0,
             "extra_body": {"ignore_eos": True}} for p in PROMPTS[:8]]


def resize(server: Server, size, key: str = "k") -> tuple[int, dict]:
    status, text = curl(server.url + "/admin/kv-cache", "-H", f"Authorization: Bearer {key}",
                        data=json.dumps({"bytes": size}))
    return status, json.loads(text)


def test_grow_shrink_below_use_and_grow_again_under_load():
    plain = Server("--kv-cache-memory", "64MiB")
    try:
        alone = [plain.client.completions.create(model="m", **kw).choices[0].text
                 for kw in REQUESTS]
    finally:
        assert plain.stop() == 0

    s = Server("--kv-cache-memory", str(16 * BLOCK), "--kv-cache-max-memory", "64MiB",
               "--max-num-seqs", "8", "--api-key", "k", api_key="k")
    try:
        assert s.metrics()["cortexstream:kv_cache_blocks_total"] == 16
        out: list = []
        runner = threading.Thread(target=lambda: out.append(
            run_streams(s.client, REQUESTS, workers=len(REQUESTS))))
        runner.start()
        time.sleep(0.5)
        # Too small for the requests already accepted (each may reach 15 blocks): refused.
        status, body = resize(s, 4 * BLOCK)
        assert status == 400 and "already accepted" in body["error"]["message"], body
        status, body = resize(s, "32MiB")
        assert status == 200, body
        assert body["blocks"] == 32 * 2**20 // BLOCK and body["bytes"] == body["blocks"] * BLOCK
        deadline = time.time() + 60
        while s.metrics()["cortexstream:kv_cache_blocks_used"] <= 24:
            assert time.time() < deadline
            time.sleep(0.05)
        status, body = resize(s, 16 * BLOCK)  # below what the requests hold now
        assert status == 200, body
        assert body["blocks"] == 16
        assert body["preempted_requests"] > 0  # more than 16 blocks were in use
        assert s.metrics()["cortexstream:kv_cache_blocks_total"] == 16
        assert s.metrics()["cortexstream:kv_cache_blocks_used"] <= 16
        time.sleep(1.0)
        status, body = resize(s, "48MiB")
        assert status == 200, body
        runner.join(300)
        assert out and out[0] == alone
        m = s.metrics()
        assert m['cortexstream:request_success_total{finished_reason="length"}'] == len(REQUESTS)
        assert m["cortexstream:kv_cache_blocks_total"] == 48 * 2**20 // BLOCK
        assert m["cortexstream:kv_cache_blocks_used"] == 0
        # After all that, the server still answers like an unloaded one.
        again = [s.client.completions.create(model="m", **kw).choices[0].text
                 for kw in REQUESTS[:2]]
        assert again == alone[:2]
    finally:
        assert s.stop() == 0


def test_bad_resizes_are_refused_and_the_key_is_required():
    s = Server("--kv-cache-memory", str(16 * BLOCK), "--kv-cache-max-memory", str(32 * BLOCK),
               "--api-key", "k", api_key="k")
    try:
        status, body = resize(s, 33 * BLOCK)
        assert status == 400 and str(32 * BLOCK) in body["error"]["message"], body
        status, body = resize(s, 100)
        assert status == 400 and "one block" in body["error"]["message"], body
        for bad in (-5, "lots", None, 1.5):
            status, body = resize(s, bad)
            assert status == 400 and body["error"]["param"] == "bytes", (bad, body)
        status, _ = curl(s.url + "/admin/kv-cache", data=json.dumps({"bytes": 20 * BLOCK}))
        assert status == 401
        status, body = resize(s, "", key="wrong")
        assert status == 401
        status, body = resize(s, 32 * BLOCK)
        assert status == 200 and body["max_bytes"] == 32 * BLOCK
        status, body = resize(s, 1 * BLOCK)  # nothing accepted: as small as one block
        assert status == 200 and body["blocks"] == 1
        assert s.metrics()["cortexstream:kv_cache_blocks_total"] == 1
        status, body = resize(s, 16 * BLOCK)
        assert status == 200
        r = s.client.completions.create(model="m", prompt="Hello", max_tokens=4)
        assert r.usage.completion_tokens == 4
    finally:
        assert s.stop() == 0
