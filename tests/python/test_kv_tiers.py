"""The tiers below the KV pool: a local disk tier (--kv-offload-dir) and Redis (--kv-redis), with
real server processes and a real redis-server on a loopback port.

- Disk: a prompt computed by one server is written to the folder as it is computed; a restarted
  server (empty pool) loads it from disk instead of computing it, and answers the same tokens.
- Redis: two servers share one redis-server. A ~2,000-token prompt sent to A, then to B: B reports
  the prompt's whole blocks as cached (loaded from Redis), answers A's tokens, and its time to
  first token is a fraction of A's cold one (cold prefill of 2,000 tokens takes seconds; a load
  takes a tenth of a second, so the bound below leaves a wide margin on a noisy machine).
- Swap preemption: on a pool too small for the requests running together, preempted requests
  are swapped out and read back from the disk tier when they resume, with the tokens each gives
  alone (and recompute's).
- Faults: the disk tier's files damaged, swapped and deleted under a running server, and Redis
  killed mid-run: every request completes with the unloaded answer (what the tier cannot give is
  computed), nothing crashes, and the metrics count what happened.

Run from the repo root: python3 -m pytest -q tests/python/test_kv_tiers.py
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from test_server import PROMPTS, Server, curl, free_port, run_streams

REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"


def items(n: int) -> str:
    """Varied text, ~13 tokens an item (numbers keep the tokens from repeating in a pattern)."""
    return " ".join(f"Item {i}: the {['red', 'blue', 'green'][i % 3]} box holds {i * 7} stones."
                    for i in range(n))


LONG_PROMPT = items(150)  # ~2,000 tokens: the two-server test
PROMPT = items(40)        # ~530 tokens: the others (shorter, so the file runs quicker)


class Redis:
    """A redis-server on a free loopback port, without persistence."""

    def __init__(self, port: int | None = None):
        assert os.path.exists(REDIS), "redis-server is missing (scripts/install_deps.sh installs it)"
        self.port = port or free_port()
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 10
        while subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True,
                             text=True).stdout.strip() != "PONG":
            assert time.time() < deadline, "redis-server did not start"
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def keys(self) -> list[str]:
        out = subprocess.run(["redis-cli", "-p", str(self.port), "--scan"], capture_output=True,
                             text=True).stdout
        return out.split()

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def complete(server: Server, prompt: str = PROMPT, max_tokens: int = 8) -> tuple[str, int, float]:
    """(text, cached prompt tokens, seconds to the first streamed token), greedy."""
    start = time.time()
    ttft = None
    text = ""
    cached = -1
    stream = server.client.completions.create(
        model="m", prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text and ttft is None:
            ttft = time.time() - start
        if chunk.choices:
            text += chunk.choices[0].text
        if chunk.usage is not None:
            cached = chunk.usage.prompt_tokens_details.cached_tokens
    return text, cached, ttft if ttft is not None else time.time() - start


def wait_written(server: Server, tier: str, blocks: int) -> None:
    """Until the server has written `blocks` blocks to the tier and has nothing queued."""
    deadline = time.time() + 60
    while True:
        m = server.metrics()
        if (m.get(f'cortexstream:kv_tier_stored_blocks_total{{tier="{tier}"}}', 0) >= blocks and
                m["cortexstream:kv_tier_pending_store_bytes"] == 0):
            return
        assert time.time() < deadline, m
        time.sleep(0.1)


def computed_blocks(prompt: int, max_tokens: int = 8) -> int:
    """Full blocks a request writes: its prompt and every generated token but the last."""
    return (prompt + max_tokens - 1) // 16


def whole_blocks(tokens: int) -> int:
    """Prompt tokens a hit can cover: whole 16-token blocks, the last token always computed."""
    return (tokens - 1) // 16 * 16


def test_a_restarted_server_loads_the_prompt_from_the_disk_tier(tmp_path):
    a = Server("--kv-offload-dir", str(tmp_path / "kv"), "--kv-offload-size", "256MiB")
    try:
        text_a, cached, _ = complete(a)
        assert cached == 0
        n = a.metrics()["cortexstream:prompt_tokens_total"]
        wait_written(a, "disk", computed_blocks(int(n)))
        files = list((tmp_path / "kv").glob("*.kvblock"))
        assert len(files) == computed_blocks(int(n))
    finally:
        assert a.stop() == 0
    b = Server("--kv-offload-dir", str(tmp_path / "kv"), "--kv-offload-size", "256MiB")
    try:
        assert "KV tier disk:" in b.stderr()
        text_b, cached, _ = complete(b)
        assert cached == whole_blocks(int(n))
        assert text_b == text_a
        m = b.metrics()
        assert m['cortexstream:kv_hit_tokens_total{tier="disk"}'] == cached
        assert m['cortexstream:kv_tier_loaded_blocks_total{tier="disk"}'] == cached // 16
        assert m['cortexstream:kv_tier_bad_blocks_total{tier="disk"}'] == 0
        # Now the pool holds it: the next hit comes from the pool.
        assert complete(b)[1] == cached
        m = b.metrics()
        assert m['cortexstream:kv_hit_tokens_total{tier="pool"}'] == cached
    finally:
        assert b.stop() == 0


def test_two_servers_share_a_prompt_through_redis():
    redis = Redis()
    a = b = None
    try:
        a = Server("--kv-redis", redis.url)
        b = Server("--kv-redis", redis.url, "--kv-redis-prefix", "cortexstream")
        text_a, cached_a, ttft_a = complete(a, LONG_PROMPT)
        assert cached_a == 0
        n = int(a.metrics()["cortexstream:prompt_tokens_total"])
        assert n > 1900, n
        wait_written(a, "redis", computed_blocks(n))
        keys = redis.keys()
        assert len(keys) == computed_blocks(n) and all(k.startswith("cortexstream:") for k in keys)
        text_b, cached_b, ttft_b = complete(b, LONG_PROMPT)
        assert cached_b == whole_blocks(n)
        assert text_b == text_a
        m = b.metrics()
        assert m['cortexstream:kv_hit_tokens_total{tier="redis"}'] == cached_b
        assert m['cortexstream:kv_tier_up{tier="redis"}'] == 1
        assert b.metrics()["cortexstream:prompt_tokens_total"] < 32  # only the tail computed
        assert ttft_b < 0.5 * ttft_a, (ttft_a, ttft_b)
    finally:
        for s in (a, b):
            if s is not None:
                assert s.stop() == 0
        redis.stop()


def test_another_model_never_reads_the_blocks(tmp_path):
    """The Redis key and the disk file name carry the cache's identity (model file, precision,
    KV format): a server with another KV format finds nothing and computes."""
    redis = Redis()
    a = b = None
    try:
        a = Server("--kv-redis", redis.url, "--kv-offload-dir", str(tmp_path))
        complete(a)
        wait_written(a, "redis", 30)
        b = Server("--kv-redis", redis.url, "--kv-offload-dir", str(tmp_path), "--kv-dtype", "f32")
        assert complete(b)[1] == 0
        m = b.metrics()
        assert m['cortexstream:kv_hit_tokens_total{tier="redis"}'] == 0
        assert m['cortexstream:kv_hit_tokens_total{tier="disk"}'] == 0
        assert m['cortexstream:kv_tier_bad_blocks_total{tier="disk"}'] == 0
    finally:
        for s in (a, b):
            if s is not None:
                assert s.stop() == 0
        redis.stop()


def test_damaged_swapped_and_deleted_files_under_a_running_server(tmp_path):
    folder = tmp_path / "kv"
    s = Server("--kv-offload-dir", str(folder))
    try:
        text, _, _ = complete(s)
        n = int(s.metrics()["cortexstream:prompt_tokens_total"])
        wait_written(s, "disk", computed_blocks(n))
        files = sorted(folder.glob("*.kvblock"), key=lambda p: p.name)
        # Damage: flip bytes in a third, truncate a few, swap two, delete some.
        for f in files[0::6]:
            data = bytearray(f.read_bytes())
            data[len(data) // 2] ^= 0xFF
            f.write_bytes(bytes(data))
        for f in files[1::12]:
            f.write_bytes(f.read_bytes()[:1000])
        tmp = files[2].read_bytes()
        files[2].write_bytes(files[3].read_bytes())
        files[3].write_bytes(tmp)
        for f in files[4::10]:
            f.unlink()
        for _ in range(3):
            # The pool forgets, the disk tier is asked again; each damaged record found is deleted
            # and the load stops there, the rest is computed.
            assert curl(s.url + "/reset_prefix_cache", "-X", "POST")[0] == 200
            again, cached, _ = complete(s)
            assert again == text
            assert cached % 16 == 0 and cached < whole_blocks(n)
        m = s.metrics()
        assert m['cortexstream:kv_tier_bad_blocks_total{tier="disk"}'] >= 1
        assert (m['cortexstream:kv_tier_bad_blocks_total{tier="disk"}'] +
                m['cortexstream:kv_tier_lost_blocks_total{tier="disk"}']) >= 3
        assert m['cortexstream:kv_tier_up{tier="disk"}'] == 1
        assert "refused and deleted" in s.stderr()
        # The folder itself deleted: writes fail (counted), requests go on.
        shutil.rmtree(folder)
        assert curl(s.url + "/reset_prefix_cache", "-X", "POST")[0] == 200
        other = PROMPT.replace("stones", "pebbles")
        assert complete(s, other)[1] == 0
        assert complete(s)[0] == text
        assert s.proc.poll() is None
    finally:
        assert s.stop() == 0


def test_redis_killed_mid_run_then_back():
    redis = Redis()
    s = None
    try:
        s = Server("--kv-redis", redis.url)
        base, _, _ = complete(s)
        results: list[tuple[str, int, float] | Exception] = []

        def client(i: int) -> None:
            try:
                results.append(complete(s, PROMPT.replace("box", f"crate {i}"), 24))
            except Exception as e:  # noqa: BLE001 - reported below
                results.append(e)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        redis.stop()  # mid-run: prefills and write-through in flight
        for t in threads:
            t.join(120)
        assert len(results) == 4 and not any(isinstance(r, Exception) for r in results), results
        assert curl(s.url + "/reset_prefix_cache", "-X", "POST")[0] == 200
        text, cached, _ = complete(s)  # Redis down: computed
        assert text == base and cached == 0
        m = s.metrics()
        assert m['cortexstream:kv_tier_up{tier="redis"}'] == 0
        assert (m['cortexstream:kv_tier_store_errors_total{tier="redis"}'] +
                m['cortexstream:kv_tier_read_errors_total{tier="redis"}']) > 0
        assert "cannot" in s.stderr()
        # Redis back (empty: no persistence) on the same port: the server's idle probe
        # reconnects without traffic, and the next prompt is written there.
        redis.start()
        deadline = time.time() + 30
        while s.metrics()['cortexstream:kv_tier_up{tier="redis"}'] == 0:
            assert time.time() < deadline
            time.sleep(0.2)
        stored = s.metrics()['cortexstream:kv_tier_stored_blocks_total{tier="redis"}']
        complete(s, PROMPT.replace("stones", "marbles"), 1)
        wait_written(s, "redis", int(stored) + 1)
        assert len(redis.keys()) > 0
        assert s.proc.poll() is None
    finally:
        if s is not None:
            assert s.stop() == 0
        redis.stop()


def test_swap_preemption_reads_blocks_back_and_keeps_outputs(tmp_path):
    # 16 blocks of 16 tokens (360 KiB each for this model's f16 K/V); six requests of ~40 prompt
    # tokens + 72 generated (7-8 blocks each) run together: at most two fit, so requests are
    # preempted with several full blocks each, and swapped out.
    requests = [{"prompt": (p + " ") * 6, "max_tokens": 72, "temperature": 0,
                 "extra_body": {"ignore_eos": True}} for p in PROMPTS[:6]]
    recompute = Server("--kv-cache-memory", "5760KiB", "--max-num-seqs", "6")
    try:
        expected = run_streams(recompute.client, requests, workers=len(requests))
        assert recompute.metrics()["cortexstream:num_preemptions_total"] > 0
    finally:
        assert recompute.stop() == 0
    s = Server("--kv-cache-memory", "5760KiB", "--max-num-seqs", "6", "--preemption-mode", "swap",
               "--kv-offload-dir", str(tmp_path))
    try:
        assert s.metrics()["cortexstream:kv_cache_blocks_total"] == 16
        together = run_streams(s.client, requests, workers=len(requests))
        m = s.metrics()
        assert m["cortexstream:num_preemptions_total"] > 0
        assert m['cortexstream:kv_hit_tokens_total{tier="disk"}'] > 0
        assert m["cortexstream:num_requests_swapped"] == 0
        assert m['cortexstream:request_success_total{finished_reason="length"}'] == len(requests)
        assert together == expected
        alone = [s.client.completions.create(model="m", **kw).choices[0].text for kw in requests]
        assert together == alone
    finally:
        assert s.stop() == 0


def test_swap_needs_a_disk_tier():
    with pytest.raises(RuntimeError, match="disk tier"):
        Server("--preemption-mode", "swap")
