"""`cortexstream serve` on Gemma 3 270M (gemma3 architecture, SentencePiece vocabulary, K-quants,
sliding-window layers, no chat template in the file): the server agrees with `generate`, renders
the built-in Gemma chat template, keeps control-token text typed by a user as text, and a prompt
longer than the sliding window (512) gives the same tokens whether it runs alone or batched with
other requests.
"""
from __future__ import annotations

import concurrent.futures
import json
import subprocess

import pytest

from test_server import BIN, REPO, Server, curl

GEMMA = REPO / "models" / "gemma-3-270m-q4_k_m.gguf"
LONG = " ".join(f"Item {i}: the {['red', 'green', 'blue', 'amber'][i % 4]} box holds {i * 7} stones."
                for i in range(60)) + " The box that holds 112 stones is"


def cli(*args: str) -> dict | list:
    proc = subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def server():
    if not GEMMA.exists():
        pytest.fail(f"{GEMMA} missing: run scripts/fetch_model.sh gemma3-270m")
    s = Server("--kv-cache-memory", "64MiB", model=GEMMA)
    yield s
    assert s.stop() == 0


def test_completion_equals_generate(server):
    r = server.client.completions.create(model="m", prompt="The capital of France is",
                                         max_tokens=16, temperature=0,
                                         extra_body={"ignore_eos": True})
    want = cli("generate", "--model", str(GEMMA), "--prompt", "The capital of France is",
               "--temperature", "0", "--max-tokens", "16", "--ignore-eos", "--json")
    assert r.choices[0].text == want["text"]
    assert r.usage.prompt_tokens == 6  # <bos> + 5 tokens, as llama.cpp tokenizes it


def test_chat_uses_the_gemma_template(server):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi <end_of_turn> there"}]
    status, body = curl(server.url + "/v1/chat/completions/render",
                        data=json.dumps({"messages": messages}))
    assert status == 200, body
    ids = json.loads(body)["token_ids"]
    # The template's markers are control tokens (one <end_of_turn>, two <start_of_turn>: the system
    # message is folded into the user turn); the <end_of_turn> the user typed stays text.
    end, start = cli("tokenize", "--model", str(GEMMA), "<end_of_turn><start_of_turn>")[1:]
    assert ids[0] == 2 and ids[1] == start
    assert ids.count(end) == 1 and ids.count(start) == 2
    text = ("<start_of_turn>user\nBe brief.\n\nHi <end_of_turn> there<end_of_turn>\n"
            "<start_of_turn>model\n")
    assert ids[-3:] == cli("tokenize", "--model", str(GEMMA), text)[-3:]

    r = server.client.chat.completions.create(model="m", messages=messages, max_tokens=8,
                                              temperature=0)
    assert r.usage.prompt_tokens == len(ids)
    stream = server.client.chat.completions.create(model="m", messages=messages, max_tokens=8,
                                                   temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == \
        r.choices[0].message.content


def test_prompt_past_the_sliding_window_is_batch_invariant(server):
    n = len(cli("tokenize", "--model", str(GEMMA), LONG))
    assert n > 600, n  # crosses the 512-token window of the sliding-window layers
    alone = server.client.completions.create(model="m", prompt=LONG, max_tokens=12, temperature=0,
                                             extra_body={"ignore_eos": True}).choices[0].text

    def one(prompt: str) -> str:
        return server.client.completions.create(model="m", prompt=prompt, max_tokens=12,
                                                temperature=0,
                                                extra_body={"ignore_eos": True}).choices[0].text

    prompts = [LONG, "Once upon a time", LONG[:900], "def add(a, b):", LONG]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(one, prompts))
    assert got[0] == got[4] == alone
    want = cli("generate", "--model", str(GEMMA), "--prompt", LONG, "--temperature", "0",
               "--max-tokens", "12", "--ignore-eos", "--json")
    assert alone == want["text"]
