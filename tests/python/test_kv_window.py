"""Attention sinks and a sliding window per request (StreamingLLM): the `kv_window` and `kv_sinks`
request fields, with a real server (`--max-model-len 256`) and real clients (curl and the official
`openai` package, where the fields go in `extra_body`).

What is proven:
- Past the context in bounded memory: on a pool of 20 blocks (320 tokens) a request of a ~26-token
  prompt and 420 greedy tokens with kv_window 96 and kv_sinks 4 completes (finish_reason
  "length", 420 completion tokens): 446 positions, far past the 256-token context (so its window
  moves back next to the sinks, keys re-rotated: at 256 and again at 400) and more than the pool
  could ever hold. Sampled from /metrics all the while, the pool's used blocks never exceed what its sinks and
  window may touch at once: 1 sink block + ceil((96 - 2 + 96) / 16) + 1 = 14 blocks (the step may
  be a whole window wide). The same request without kv_window is refused (400,
  context_length_exceeded).
- Batch invariance: the same windowed request streamed through the openai client, not streamed
  through curl, and again while three plain requests run beside it (started once its window has
  moved back), gives the same text every time; the plain requests give their unloaded texts too.
- Full attention until a key is skipped: the token generated at position p attends keys 0..p;
  the window drops a key only once p >= kv_sinks + kv_window. So with a 10-token prompt, kv_window
  96 and kv_sinks 4 the first 96 + 4 - 10 + 1 = 91 tokens are those of a plain request, token and
  logprob alike, bit for bit; the 92nd token's logprob differs (the window is really applied).
- The chat endpoint takes the fields too (and answers a short request as a plain one would).
- Refusals, each a 400 with error.param: kv_sinks without kv_window (kv_sinks); kv_window with
  n > 1 or best_of (kv_window); kv_sinks + kv_window + max(kv_window, widest sliding layer window)
  + 2 x 16 > max-model-len (kv_window, "two blocks"; exactly 256 is accepted); out-of-range
  values; and, on a second server whose pool is 8 blocks, a window needing more blocks than the
  pool has (context_length_exceeded), while a narrower window on that pool still runs past the
  context. Each server keeps serving afterwards, and both exit 0 on SIGTERM.

Run from the repo root: python3 -m pytest -q tests/python/test_kv_window.py
"""
from __future__ import annotations

import json
import threading
import time

import pytest

from test_server import BACKEND, PROMPTS, Server, curl, run_streams

pytestmark = pytest.mark.skipif(BACKEND != "cpu", reason="kv_window needs the cpu backend")

BLOCK = 368640      # bytes of one KV block of the default model: 16 tokens, f16 K/V
BLOCK_TOKENS = 16
POOL = 20           # blocks: 320 tokens
MODEL_LEN = 256
WINDOW, SINKS = 96, 4
# Blocks a windowed sequence may hold at once: its sink blocks, then the window's span (W - 1 keys
# back through a step's last position, a step being at most a window wide), plus a partial block.
BOUND = -(-SINKS // BLOCK_TOKENS) + -(-(WINDOW - 2 + WINDOW) // BLOCK_TOKENS) + 1
assert BOUND == 14

LONG_PROMPT = ("The history of Rome is long and full of emperors, wars, senators, and roads that "
               "stretched across the whole of Europe and beyond")
MAX_TOKENS = 420
WINDOWED = {"prompt": LONG_PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "kv_window": WINDOW, "kv_sinks": SINKS}

_reference: dict[str, str] = {}  # the windowed request's text, streamed alone (first test)


@pytest.fixture(scope="module")
def server():
    s = Server("--max-model-len", str(MODEL_LEN), "--kv-cache-memory", str(POOL * BLOCK))
    yield s
    assert s.stop() == 0


def post(server: Server, body: dict, path: str = "/v1/completions") -> tuple[int, dict]:
    status, out = curl(server.url + path, data=json.dumps(body))
    return status, json.loads(out)


def stream_openai(server: Server, body: dict, on_chunk=None) -> tuple[str, str, int]:
    """(text, finish_reason, completion tokens) of `body` streamed through the openai client; the
    kv fields and ignore_eos go in extra_body. on_chunk(number of chunks so far) after each."""
    kw = {k: v for k, v in body.items() if k in ("prompt", "max_tokens", "temperature")}
    extra = {k: v for k, v in body.items() if k not in kw}
    text, finish, tokens, chunks = "", None, -1, 0
    for chunk in server.client.completions.create(
            model="m", stream=True, stream_options={"include_usage": True}, extra_body=extra,
            **kw):
        if chunk.choices:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
            chunks += 1
            if on_chunk:
                on_chunk(chunks)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return text, finish, tokens


def reference(server: Server) -> str:
    if "text" not in _reference:
        _reference["text"] = stream_openai(server, WINDOWED)[0]
    return _reference["text"]


# ---- past the context in bounded memory ---------------------------------------------------------

def test_past_the_context_in_bounded_memory(server):
    base = server.metrics()
    assert base["cortexstream:kv_cache_blocks_total"] == POOL
    assert base["cortexstream:kv_cache_blocks_used"] == 0

    samples: list[float] = []
    done = threading.Event()

    def sample():
        while not done.is_set():
            samples.append(server.metrics()["cortexstream:kv_cache_blocks_used"])
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        text, finish, tokens = stream_openai(server, WINDOWED)
    finally:
        done.set()
        sampler.join(30)
    _reference["text"] = text

    assert finish == "length" and tokens == MAX_TOKENS
    m = server.metrics()
    prompt_tokens = m["cortexstream:prompt_tokens_total"] - base["cortexstream:prompt_tokens_total"]
    assert 20 <= prompt_tokens <= 40
    assert m["cortexstream:generation_tokens_total"] - \
        base["cortexstream:generation_tokens_total"] == MAX_TOKENS
    # Past the context, and more than the whole pool could hold.
    assert prompt_tokens + MAX_TOKENS > MODEL_LEN
    assert prompt_tokens + MAX_TOKENS > POOL * BLOCK_TOKENS
    # Bounded all the while (and the sampler did see it running).
    assert len(samples) > 50, samples
    assert max(samples) <= BOUND, max(samples)
    assert max(samples) >= 3, samples
    assert m["cortexstream:kv_cache_blocks_used"] == 0

    # The same request without a window is refused: it does not fit the context.
    plain = {k: v for k, v in WINDOWED.items() if k not in ("kv_window", "kv_sinks")}
    status, body = post(server, plain)
    assert status == 400, body
    assert body["error"]["code"] == "context_length_exceeded"
    assert body["error"]["param"] == "prompt"


# ---- batch invariance ---------------------------------------------------------------------------

def test_same_text_streamed_plain_and_beside_other_requests(server):
    alone = reference(server)
    assert len(alone) > 1000

    # Not streamed, through curl.
    status, body = post(server, WINDOWED)
    assert status == 200, body
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == MAX_TOKENS
    assert body["choices"][0]["text"] == alone

    # Beside three plain requests, started once the window has moved back (positions past 256).
    others = [{"prompt": p, "max_tokens": 24, "temperature": 0, "extra_body": {"ignore_eos": True}}
              for p in PROMPTS[:3]]
    others_alone = [server.client.completions.create(model="m", **kw).choices[0].text
                    for kw in others]
    moved_back = threading.Event()
    finished = threading.Event()
    out: list = []

    def windowed():
        try:
            out.append(stream_openai(server, WINDOWED,
                                     on_chunk=lambda n: n >= 300 and moved_back.set()))
        finally:
            moved_back.set()
            finished.set()

    runner = threading.Thread(target=windowed)
    runner.start()
    assert moved_back.wait(60)
    together = run_streams(server.client, others, workers=len(others))
    overlapped = not finished.is_set()
    runner.join(120)
    assert out and out[0] == (alone, "length", MAX_TOKENS)
    assert together == others_alone
    assert overlapped  # the plain requests ended while the windowed one still ran
    assert server.metrics()["cortexstream:kv_cache_blocks_used"] == 0


# ---- full attention until a key is skipped ------------------------------------------------------

def test_first_tokens_equal_full_attention(server):
    prompt = "The quick brown fox jumps over the lazy dog."
    body = {"prompt": prompt, "max_tokens": 100, "temperature": 0, "ignore_eos": True,
            "logprobs": 0}
    status, plain = post(server, body)
    assert status == 200, plain
    status, win = post(server, {**body, "kv_window": WINDOW, "kv_sinks": SINKS})
    assert status == 200, win
    n = win["usage"]["prompt_tokens"]
    assert n == plain["usage"]["prompt_tokens"] == 10
    exact = WINDOW + SINKS - n + 1  # tokens generated at positions < kv_sinks + kv_window
    assert exact == 91
    pl, wl = plain["choices"][0]["logprobs"], win["choices"][0]["logprobs"]
    assert wl["tokens"][:exact] == pl["tokens"][:exact]
    assert wl["token_logprobs"][:exact] == pl["token_logprobs"][:exact]
    # The next token is the first to attend without a key (position 4): its logits differ.
    assert wl["token_logprobs"][exact] != pl["token_logprobs"][exact]


# ---- chat ---------------------------------------------------------------------------------------

def test_chat_takes_kv_window(server):
    messages = [{"role": "user", "content": "Name the capital city of France."}]
    plain = server.client.chat.completions.create(model="m", messages=messages, max_tokens=8,
                                                  temperature=0)
    win = server.client.chat.completions.create(
        model="m", messages=messages, max_tokens=8, temperature=0,
        extra_body={"kv_window": WINDOW, "kv_sinks": SINKS})
    assert win.object == "chat.completion"
    assert win.usage.completion_tokens == plain.usage.completion_tokens > 0
    # A short prompt and 8 tokens: no key is ever skipped, so the answer is the plain one.
    assert win.choices[0].message.content == plain.choices[0].message.content


# ---- refusals -----------------------------------------------------------------------------------

C, CHAT = "/v1/completions", "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("path,body,param,needle", [
    (C, {"prompt": "x", "kv_sinks": 4}, "kv_sinks", "needs 'kv_window'"),
    (C, {"prompt": "x", "kv_sinks": 0}, "kv_sinks", "needs 'kv_window'"),
    (CHAT, {"messages": MSG, "kv_sinks": 4}, "kv_sinks", "needs 'kv_window'"),
    (C, {"prompt": "x", "kv_window": 32, "n": 2}, "kv_window", "n > 1 or best_of"),
    (C, {"prompt": "x", "kv_window": 32, "best_of": 2}, "kv_window", "n > 1 or best_of"),
    (CHAT, {"messages": MSG, "kv_window": 32, "n": 2}, "kv_window", "n > 1 or best_of"),
    # 0 + 113 + 113 + 32 = 258 > 256; 33 + 96 + 96 + 32 = 257 > 256
    (C, {"prompt": "x", "kv_window": 113}, "kv_window", "two blocks"),
    (C, {"prompt": "x", "kv_window": 96, "kv_sinks": 33}, "kv_window", "two blocks"),
    (CHAT, {"messages": MSG, "kv_window": 200, "kv_sinks": 4}, "kv_window", "two blocks"),
    (C, {"prompt": "x", "kv_window": 0}, "kv_window", None),
    (C, {"prompt": "x", "kv_window": 8, "kv_sinks": -1}, "kv_sinks", None),
    (C, {"prompt": "x", "kv_window": "8"}, "kv_window", None),
])
def test_refusals(server, path, body, param, needle):
    status, out = post(server, {"max_tokens": 2, **body}, path)
    assert status == 400, out
    err = out["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    if needle:
        assert needle in err["message"], err
    # Still serving.
    r = server.client.completions.create(model="m", prompt="Hello", max_tokens=2)
    assert r.usage.completion_tokens == 2


def test_widest_windows_that_fit_the_context_are_accepted(server):
    # kv_sinks + 2 x kv_window + 32 == 256 exactly.
    for fields in ({"kv_window": 112}, {"kv_window": 96, "kv_sinks": 32}):
        status, out = post(server, {"prompt": "Hello", "max_tokens": 2, **fields})
        assert status == 200, (fields, out)
        assert out["usage"]["completion_tokens"] == 2


def test_window_wider_than_the_pool_is_refused():
    small = Server("--max-model-len", str(MODEL_LEN), "--kv-cache-memory", str(8 * BLOCK))
    try:
        assert small.metrics()["cortexstream:kv_cache_blocks_total"] == 8
        status, out = post(small, {"prompt": "Once upon a time", "max_tokens": 8,
                                   "kv_window": WINDOW, "kv_sinks": SINKS})
        assert status == 400, out
        assert out["error"]["code"] == "context_length_exceeded", out
        assert out["error"]["param"] == "kv_window", out
        assert f"needs {BOUND} KV blocks; the pool has 8" in out["error"]["message"], out
        status, out = post(small, {"messages": MSG, "max_tokens": 8, "kv_window": WINDOW,
                                   "kv_sinks": SINKS}, CHAT)
        assert status == 400 and out["error"]["code"] == "context_length_exceeded", out
        assert out["error"]["param"] == "kv_window", out
        # Without a window, 250 tokens do not fit the 8-block pool (128 tokens) either...
        status, out = post(small, {"prompt": "Once upon a time", "max_tokens": 250})
        assert status == 400 and out["error"]["code"] == "context_length_exceeded", out
        # ...while a 32-token window (1 + 5 blocks) runs past the 256-token context on it.
        status, out = post(small, {"prompt": "Once upon a time", "max_tokens": 260,
                                   "temperature": 0, "ignore_eos": True, "kv_window": 32,
                                   "kv_sinks": SINKS})
        assert status == 200, out
        assert out["choices"][0]["finish_reason"] == "length"
        assert out["usage"]["completion_tokens"] == 260
        assert out["usage"]["prompt_tokens"] + 260 > MODEL_LEN
        assert small.metrics()["cortexstream:kv_cache_blocks_used"] == 0
    finally:
        assert small.stop() == 0
