"""Prefix caching and KV sharing through the real server and real clients: cached prompt tokens in
`usage`, identical answers with the cache on and off, n > 1 and best_of on both endpoints, the
prefix-cache metrics, and the KV events a router subscribes to (pyzmq + msgpack).
"""
from __future__ import annotations

import concurrent.futures
import json

import pytest

from test_server import Server, curl, free_port, sse_events

zmq = pytest.importorskip("zmq")
msgpack = pytest.importorskip("msgpack")

BLOCK = 16  # the server's default block size
SYSTEM = ("You are a careful assistant. Answer in one short sentence, name your sources when "
          "asked, and say so when you do not know. ") * 6


@pytest.fixture(scope="module")
def server():
    s = Server("--kv-cache-memory", "64MiB", "--max-num-seqs", "16")
    yield s
    assert s.stop() == 0


def completion(server, prompt: str, **kw) -> dict:
    status, body = curl(server.url + "/v1/completions",
                        data=json.dumps({"prompt": prompt, "max_tokens": 8, "temperature": 0,
                                         **kw}))
    assert status == 200, body
    return json.loads(body)


def test_second_request_reports_its_cached_prompt_tokens(server):
    first = completion(server, SYSTEM + "Where is Paris?")
    second = completion(server, SYSTEM + "Where is Rome?")
    prompt = second["usage"]["prompt_tokens"]
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached % BLOCK == 0
    # Everything up to the question is shared; at least one token is always computed.
    assert prompt - 2 * BLOCK <= cached < prompt, second["usage"]
    # The very same prompt again: all of it but the tail of the last block.
    again = completion(server, SYSTEM + "Where is Paris?")
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == \
        (first["usage"]["prompt_tokens"] - 1) // BLOCK * BLOCK
    assert again["choices"][0]["text"] == first["choices"][0]["text"]


def test_openai_client_sees_cached_tokens_in_chat(server):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Name a river."}]
    server.client.chat.completions.create(model="m", messages=messages, max_tokens=4,
                                          temperature=0)
    r = server.client.chat.completions.create(model="m", messages=messages, max_tokens=4,
                                              temperature=0)
    assert r.usage.prompt_tokens_details.cached_tokens > 0


def test_prefix_metrics_count_queries_and_hits(server):
    before = server.metrics()
    r = completion(server, SYSTEM + "What is water?")
    after = server.metrics()
    queried = after["cortexstream:prefix_cache_queries_total"] - \
        before["cortexstream:prefix_cache_queries_total"]
    hit = after["cortexstream:prefix_cache_hits_total"] - \
        before["cortexstream:prefix_cache_hits_total"]
    assert queried == r["usage"]["prompt_tokens"]
    assert hit == r["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert after["cortexstream:kv_cache_blocks_cached"] > 0
    assert after["cortexstream:kv_cache_blocks_used"] == 0


def test_answers_are_the_same_without_the_cache_and_under_lpm():
    questions = ["Where is Paris?", "Where is Rome?", "Name a metal.", "What is fire?"]
    configs = ((), ("--no-prefix-caching",), ("--schedule-policy", "lpm"))
    answers = {}
    for flags in configs:
        s = Server("--kv-cache-memory", "64MiB", *flags)
        try:
            # Twice each question, 8 at once: the second of each hits the cache when it is on.
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                results = list(pool.map(lambda q: completion(s, SYSTEM + q, max_tokens=12),
                                        questions * 2))
            answers[flags] = [(r["choices"][0]["text"],
                               r["usage"]["prompt_tokens_details"]["cached_tokens"])
                              for r in results]
        finally:
            assert s.stop() == 0
    on, off, lpm = (answers[c] for c in configs)
    assert [t for t, _ in on] == [t for t, _ in off] == [t for t, _ in lpm]
    assert all(c == 0 for _, c in off)


def test_n_choices_on_both_endpoints(server):
    r = server.client.completions.create(model="m", prompt="Once upon a time", max_tokens=8,
                                         n=3, temperature=0.9, seed=5)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.text for c in r.choices}) > 1
    assert 3 <= r.usage.completion_tokens <= 3 * 8  # summed over the choices
    chat = server.client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Name a colour."}], max_tokens=6, n=2,
        temperature=0.9, seed=3)
    assert [c.index for c in chat.choices] == [0, 1]
    assert all(c.message.role == "assistant" for c in chat.choices)


def test_n_choice_i_is_the_request_with_seed_plus_i(server):
    base = dict(prompt="The best thing about winter is", max_tokens=10, temperature=1.0)
    r = completion(server, **base, n=3, seed=11)
    for i, c in enumerate(r["choices"]):
        alone = completion(server, **base, seed=11 + i)
        assert c["text"] == alone["choices"][0]["text"], i


def test_streamed_choices_carry_their_index(server):
    status, body = curl(server.url + "/v1/chat/completions",
                        data=json.dumps({"messages": [{"role": "user", "content": "Say hi."}],
                                         "max_tokens": 6, "n": 3, "stream": True,
                                         "temperature": 0.8, "seed": 1,
                                         "stream_options": {"include_usage": True}}))
    assert status == 200
    events = sse_events(body)
    text = {0: "", 1: "", 2: ""}
    finished = set()
    roles = set()
    for e in events[:-1]:
        (choice,) = e["choices"]
        if choice["delta"].get("role"):
            roles.add(choice["index"])
        text[choice["index"]] += choice["delta"].get("content", "")
        if choice["finish_reason"]:
            finished.add(choice["index"])
    assert roles == finished == {0, 1, 2}
    usage = events[-1]["usage"]
    assert usage["completion_tokens"] <= 18 and usage["prompt_tokens_details"]["cached_tokens"] >= 0


def test_best_of_returns_n_whole_choices(server):
    r = completion(server, "My favourite animal is", max_tokens=6, temperature=1.0, n=2,
                   best_of=4, seed=7)
    assert [c["index"] for c in r["choices"]] == [0, 1]
    assert all(c["finish_reason"] in ("stop", "length") for c in r["choices"])
    chat = server.client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Name a colour."}], max_tokens=6, n=1,
        temperature=1.0, seed=2, extra_body={"best_of": 3})
    assert len(chat.choices) == 1 and chat.choices[0].message.content


def test_kv_events_reach_a_zmq_subscriber():
    port = free_port()
    # 8 MiB: 22 blocks of this model's KV, about two of the prompts below.
    s = Server("--kv-cache-memory", "8MiB", "--kv-events-endpoint", f"tcp://127.0.0.1:{port}")
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.RCVTIMEO, 5000)
    sub.connect(f"tcp://127.0.0.1:{port}")
    try:
        stored, removed, seqs = [], [], []
        # Prompts that differ from their first token, so each stores its own blocks and later ones
        # evict earlier ones. (The subscriber may miss the first batches: ZeroMQ's slow joiner.)
        prompts = [f"Note {i}. " + SYSTEM for i in range(8)]
        for p in prompts:
            completion(s, p, max_tokens=2)
        while True:
            try:
                topic, seq, payload = sub.recv_multipart()
            except zmq.Again:
                break
            seqs.append(int.from_bytes(seq, "big"))
            ts, events, _rank = msgpack.unpackb(payload)
            for e in events:
                if e["type"] == "BlockStored":
                    stored.append(e)
                elif e["type"] == "BlockRemoved":
                    removed.append(e)
        assert seqs and seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        assert stored, "no BlockStored event"
        e = stored[-1]
        assert e["block_size"] == BLOCK
        assert len(e["token_ids"]) == BLOCK * len(e["block_hashes"])
        assert all(isinstance(h, int) for h in e["block_hashes"])
        hashes = {h for ev in stored for h in ev["block_hashes"]}
        assert removed and set(removed[-1]["block_hashes"]) <= hashes
    finally:
        sub.close(0)
        ctx.term()
        assert s.stop() == 0
