"""A bounded soak test of `cortexstream serve` (about 1.5 minutes): a KV pool so small that
requests preempt each other, more streaming clients than it can run or queue, clients that vanish
mid-stream, 200 connections stuck in their headers, bursts past the queue, and a SIGTERM with
streams in flight. It proves that under all of that:

- every response that completes is exactly the greedy output of the same request run alone;
- a refusal is a fast 429/503, never a hang or another error;
- /health never waits behind the load;
- nothing leaks: KV blocks return to 0, nothing keeps running, RSS stays flat;
- shutdown ends every stream properly (complete, or cut with a `shutting_down` error frame)
  and exits 0.
"""
from __future__ import annotations

import concurrent.futures
import json
import random
import signal
import socket
import struct
import subprocess
import threading
import time

import pytest

from test_server import BIN, MODEL, PROMPTS, Server, sse_events
from test_server_hardening import (SlowHeaders, iter_chunks, post_bytes, read_body,
                                   read_head, request, rss_kib, strip_sse_comments, timed_get)

pytestmark = pytest.mark.skipif(not BIN.exists() or not MODEL.exists(),
                                reason="needs the cortexstream binary and the default model")

SOAK_SECONDS = 60       # the concurrent phase; the whole test takes about 1.5 minutes
STREAM_CLIENTS = 64     # more than --max-num-seqs 8 + --max-queue 24: some are always refused
SLOW_CONNECTIONS = 200
REFUSAL_WITHIN_S = 2.0  # a refusal is decided on arrival; 2 s is slack for a loaded 2-core machine
HEALTH_WITHIN_S = 1.0   # /health takes milliseconds unless it waits behind other work
REQUEST_DEADLINE_S = 30  # one request, queued behind 31 others of 24 tokens: a few seconds

# 16 distinct greedy requests: each needs 2 KV blocks (a prompt under 9 tokens + 24 generated),
# so one always fits the 11-block pool alone, but 8 running at once need ~16 blocks: preemptions.
REQUESTS = [{"prompt": p, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
            for p in PROMPTS[:16]]


class Tally:
    """Outcomes of all clients, thread-safe."""

    def __init__(self):
        self.lock = threading.Lock()
        self.done = 0          # complete, equal to the reference
        self.cut = 0           # cut at shutdown, with the shutting_down error frame
        self.aborted = 0       # the client hung up on purpose
        self.refused: list[tuple[int, float]] = []  # (status, seconds to the answer)
        self.bad: list[str] = []  # anything else: wrong text, bad status, broken stream, ...

    def add(self, kind: str, detail=None):
        with self.lock:
            if kind == "refused":
                self.refused.append(detail)
            elif kind == "bad":
                self.bad.append(str(detail)[:500])
            else:
                setattr(self, kind, getattr(self, kind) + 1)


def check_sse(body: bytes, reference: str, shutting_down: bool) -> tuple[str, object]:
    """Classifies a finished 200 stream: "done" (text == reference), "cut" (only while shutting
    down: an error frame with code shutting_down after chunks without a finish reason), or "bad"."""
    try:
        events = sse_events(strip_sse_comments(body.decode()))
    except (AssertionError, ValueError) as e:
        return "bad", f"broken SSE body ({e!r}): {body[-300:]!r}"
    if events and "error" in events[-1]:
        ok = (shutting_down and events[-1]["error"].get("code") == "shutting_down"
              and all(e["choices"][0]["finish_reason"] is None for e in events[:-1]))
        return ("cut", None) if ok else ("bad", f"error frame: {events[-1]}")
    text = "".join(e["choices"][0]["text"] for e in events)
    if text != reference:
        return "bad", f"wrong text {text!r}, expected {reference!r}"
    return "done", None


def stream_once(port: int, i: int, reference: str, abort_after: int | None,
                shutting_down: bool = False, on_sent=None) -> tuple[str, object]:
    """One streamed completion of REQUESTS[i] over a raw socket. With abort_after = k the client
    resets the connection after k chunks (0: right after sending the request)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=REQUEST_DEADLINE_S)
    f = None
    body = b""
    try:
        s.sendall(post_bytes("/v1/completions", {**REQUESTS[i], "stream": True}))
        sent_at = time.monotonic()
        if on_sent:
            on_sent()
        if abort_after == 0:
            return "aborted", None
        f = s.makefile("rb")
        status, headers = read_head(f)
        if status != 200:
            body = read_body(f, headers)
            if status in (429, 503):
                return "refused", (status, time.monotonic() - sent_at)
            return "bad", f"status {status}: {body[:300]!r}"
        body = b""
        for n, chunk in enumerate(iter_chunks(f), 1):
            body += chunk
            if abort_after and n >= abort_after:
                return "aborted", None
            if time.monotonic() - sent_at > REQUEST_DEADLINE_S:
                return "bad", "stream took longer than the deadline"
        return check_sse(body, reference, shutting_down)
    except (OSError, EOFError, ValueError, AssertionError) as e:
        return "bad", f"connection error: {e!r} after {len(body)} body bytes: {body[-200:]!r}"
    finally:
        if abort_after is not None:
            # An abrupt close: RST, as when a client process dies.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        if f:
            f.close()
        s.close()


def test_soak():
    # note: --shutdown-grace 1 so that the SIGTERM at the end really cuts queued streams (and the
    # cut path is exercised), not only waits for them.
    server = Server("--kv-cache-memory", "4MiB", "--max-num-seqs", "8", "--max-queue", "24",
                        "--http-read-timeout", "5", "--shutdown-grace", "1")
    slow = None
    try:
        m = server.metrics()
        assert m["cortexstream:kv_cache_blocks_total"] == 11  # 4 MiB / 360 KiB per block

        # ---- references: each request alone, sequentially (also the allocator's warm-up) ----
        references = []
        for body in REQUESTS:
            status, _, out = request(server, "POST", "/v1/completions", json.dumps(body))
            assert status == 200, out
            references.append(json.loads(out)["choices"][0]["text"])
        m = server.metrics()
        assert m["cortexstream:kv_cache_blocks_used"] == 0
        assert m["cortexstream:num_preemptions_total"] == 0  # alone, a request always fits
        rss_start = rss_kib(server.proc.pid)

        tally = Tally()
        stop = threading.Event()

        # ---- the load -----------------------------------------------------------------------
        def streaming_client(n: int):
            rng = random.Random(1000 + n)
            while not stop.is_set():
                i = rng.randrange(len(REQUESTS))
                abort_after = rng.randint(0, 8) if rng.random() < 0.25 else None
                kind, detail = stream_once(server.port, i, references[i], abort_after)
                if kind == "bad":
                    detail = f"request {i}, abort_after={abort_after}: {detail}"
                tally.add(kind, detail)
                if kind == "refused":
                    stop.wait(rng.uniform(0.2, 1.0))  # back off, as Retry-After asks

        def flood_one(i: int):
            t = time.monotonic()
            try:
                status, headers, out = request(server, "POST", "/v1/completions",
                                               json.dumps(REQUESTS[i]), timeout=REQUEST_DEADLINE_S)
            except OSError as e:
                return "bad", f"flood connection error: {e!r}"
            if status == 200:
                text = json.loads(out)["choices"][0]["text"]
                return ("done", None) if text == references[i] else \
                    ("bad", f"flood: wrong text {text!r}, expected {references[i]!r}")
            if status in (429, 503):
                if json.loads(out)["error"].get("code") == "queue_full" and \
                        "retry-after" not in headers:
                    return "bad", f"queue_full without Retry-After: {headers}"
                return "refused", (status, time.monotonic() - t)
            return "bad", f"flood status {status}: {out[:300]}"

        def flood():
            rng = random.Random(7)
            with concurrent.futures.ThreadPoolExecutor(12) as pool:
                while not stop.wait(2.0):
                    burst = [rng.randrange(len(REQUESTS)) for _ in range(12)]
                    for kind, detail in pool.map(flood_one, burst):
                        tally.add(kind, detail)

        health = {"worst": 0.0, "bad": []}

        def monitor():
            while not stop.wait(0.5):
                status, seconds = timed_get(server.url + "/health", 5)
                health["worst"] = max(health["worst"], seconds)
                if status != 200:
                    health["bad"].append(status)

        slow = SlowHeaders(server, SLOW_CONNECTIONS, period=2.0, reopen=True)
        threads = [threading.Thread(target=streaming_client, args=(n,), daemon=True)
                   for n in range(STREAM_CLIENTS)]
        threads += [threading.Thread(target=flood, daemon=True),
                    threading.Thread(target=monitor, daemon=True)]
        for t in threads:
            t.start()
        time.sleep(SOAK_SECONDS)
        stop.set()
        for t in threads:
            t.join(REQUEST_DEADLINE_S + 15)
        assert not any(t.is_alive() for t in threads), "a client hung"

        # ---- after the load: nothing leaked ---------------------------------------------------
        deadline = time.monotonic() + 5
        while True:
            m = server.metrics()
            if (m["cortexstream:kv_cache_blocks_used"] == 0
                    and m["cortexstream:num_requests_running"] == 0
                    and m["cortexstream:num_requests_waiting"] == 0):
                break
            assert time.monotonic() < deadline, m
            time.sleep(0.1)
        preemptions = m["cortexstream:num_preemptions_total"]
        # note: +8 MiB on top of 10% because glibc keeps freed memory in per-thread arenas and
        # the kernel's socket buffers of 200 live connections are charged to nobody here, but
        # the server's own per-connection state is; a real leak over ~1,000 requests and ~1,000
        # connections grows far beyond that.
        rss_bound = rss_start * 1.10 + 8 * 1024
        deadline = time.monotonic() + 5  # give the allocator a moment to return memory
        while rss_kib(server.proc.pid) > rss_bound and time.monotonic() < deadline:
            time.sleep(0.2)
        rss_end = rss_kib(server.proc.pid)

        # ---- SIGTERM with streams in flight ---------------------------------------------------
        # 24 streams (8 running + 16 queued, about 2 s of work); SIGTERM once the server has read
        # every request, so each must end complete or cut with a shutting_down frame.
        before = server.metrics()
        submitted0 = sum(v for k, v in before.items()
                         if k.startswith("cortexstream:request_success_total"))
        final = Tally()
        rng = random.Random(99)
        picks = [rng.randrange(len(REQUESTS)) for _ in range(24)]

        def final_stream(i: int):
            kind, detail = stream_once(server.port, i, references[i], None, shutting_down=True)
            final.add(kind, f"request {i}: {detail}" if kind == "bad" else detail)
        finals = [threading.Thread(target=final_stream, args=(i,), daemon=True) for i in picks]
        for t in finals:
            t.start()
        deadline = time.monotonic() + 10
        while True:
            m = server.metrics()
            finished = sum(v for k, v in m.items()
                           if k.startswith("cortexstream:request_success_total")) - submitted0
            in_flight = (m["cortexstream:num_requests_running"]
                         + m["cortexstream:num_requests_waiting"])
            if in_flight + finished >= len(picks):
                break
            assert time.monotonic() < deadline, m
            time.sleep(0.02)
        assert in_flight > 0, "every stream finished before SIGTERM: nothing was tested"
        server.proc.send_signal(signal.SIGTERM)
        try:
            exit_code = server.proc.wait(40)
        except subprocess.TimeoutExpired:
            exit_code = "still running 40 s after SIGTERM"
        for t in finals:
            t.join(REQUEST_DEADLINE_S + 5)

        # ---- verdict --------------------------------------------------------------------------
        slowest = max((seconds for _, seconds in tally.refused), default=0.0)
        print(f"soak: {tally.done} complete, {tally.aborted} aborted, {len(tally.refused)} refused "
              f"(slowest {slowest:.3f} s), {len(tally.bad)} bad; worst /health "
              f"{health['worst']:.3f} s; RSS {rss_start} -> {rss_end} KiB; {preemptions:.0f} "
              f"preemptions; {slow.dropped} slow connections closed by the server; at SIGTERM: "
              f"{final.done} complete, {final.cut} cut, {len(final.bad)} bad; exit {exit_code}")
        assert not tally.bad, tally.bad[:10]
        assert tally.done > 0
        assert all(status in (429, 503) for status, _ in tally.refused)
        assert slowest < REFUSAL_WITHIN_S, slowest
        assert not health["bad"], health["bad"]
        assert health["worst"] < HEALTH_WITHIN_S, health["worst"]
        assert rss_end <= rss_bound, (rss_start, rss_end)
        assert preemptions > 0  # the pool really was too small for the load
        assert not final.bad, final.bad[:10]
        assert final.done + final.cut == len(picks), vars(final)
        assert exit_code == 0, exit_code
    finally:
        if slow:
            slow.close()
        server.stop()
