"""KV sessions: a prompt's cached K/V saved to a file and restored, through the server
(POST /kv_sessions/save and /kv_sessions/restore, llama-server's slot save/restore for a prefix
cache) and through `chat --session`.

- A prompt computed on server A, saved, then restored on a fresh server B (same model, same
  folder): B reports the saved tokens as cached on its first request and answers with A's tokens.
- File names are confined to --kv-session-dir: paths, hidden names and missing files are refused
  with a message; without the folder the endpoints say how to turn them on; the API key guards
  them; a damaged file is refused and the server keeps serving.
- `chat --session FILE` run twice (one message each) answers as one chat with both messages, and
  the second run resumes the first's KV.

Run from the repo root: python3 -m pytest -q tests/python/test_kv_sessions.py
"""
from __future__ import annotations

import json
import subprocess

from test_server import BIN, MODEL, REPO, Server, curl

PROMPT = ("The history of the printing press begins with movable type. " * 12 +
          "In short, the press changed")


def post(server: Server, path: str, body: dict, *headers: str) -> tuple[int, dict]:
    status, text = curl(server.url + path, "-H", "Content-Type: application/json", *headers,
                        data=json.dumps(body))
    return status, json.loads(text)


def complete(server: Server) -> tuple[str, int]:
    r = server.client.completions.create(model="m", prompt=PROMPT, max_tokens=16, temperature=0,
                                         extra_body={"ignore_eos": True})
    return r.choices[0].text, r.usage.prompt_tokens_details.cached_tokens


def test_a_saved_prompt_restored_on_a_fresh_server_is_a_hit_with_the_same_tokens(tmp_path):
    a = Server("--kv-session-dir", str(tmp_path))
    try:
        text_a, cached = complete(a)
        assert cached == 0
        status, saved = post(a, "/kv_sessions/save", {"filename": "press.kv", "prompt": PROMPT})
        assert status == 200, saved
        n = saved["n_prompt_tokens"]
        assert saved["n_saved"] == (n // 16) * 16 > 0  # every whole block of the prompt
        assert saved["n_written"] == (tmp_path / "press.kv").stat().st_size
    finally:
        assert a.stop() == 0
    b = Server("--kv-session-dir", str(tmp_path))
    try:
        status, restored = post(b, "/kv_sessions/restore", {"filename": "press.kv"})
        assert status == 200, restored
        assert restored["n_restored"] == saved["n_saved"]
        assert restored["blocks_loaded"] > 0
        text_b, cached = complete(b)
        # A hit takes at most the prompt's tokens but one (whole blocks).
        assert cached == min(saved["n_saved"], (n - 1) // 16 * 16)
        assert text_b == text_a
        # Restoring again loads nothing new.
        status, again = post(b, "/kv_sessions/restore", {"filename": "press.kv"})
        assert status == 200 and again["blocks_loaded"] == 0
    finally:
        assert b.stop() == 0


def test_names_are_confined_and_bad_files_refused(tmp_path):
    folder = tmp_path / "sessions"
    folder.mkdir()
    (tmp_path / "outside.kv").write_bytes(b"x")
    s = Server("--kv-session-dir", str(folder), "--api-key", "k")
    key = ("-H", "Authorization: Bearer k")
    try:
        for name in ["../outside.kv", "/etc/passwd", ".hidden", "a/b", ""]:
            status, body = post(s, "/kv_sessions/restore", {"filename": name}, *key)
            assert status == 400, name
            assert "plain file name" in body["error"]["message"]
        status, body = post(s, "/kv_sessions/restore", {"filename": "missing.kv"}, *key)
        assert status == 404 and "no KV session named" in body["error"]["message"]
        status, body = post(s, "/kv_sessions/save", {"filename": "x.kv", "prompt": "hi"})
        assert status == 401  # the API key guards them
        # A damaged file: refused with the reason, and the server goes on serving.
        s.client.api_key = "k"
        complete(s)
        status, saved = post(s, "/kv_sessions/save", {"filename": "ok.kv", "prompt": PROMPT}, *key)
        assert status == 200 and saved["n_saved"] > 0
        data = bytearray((folder / "ok.kv").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (folder / "bad.kv").write_bytes(bytes(data))
        status, body = post(s, "/kv_sessions/restore", {"filename": "bad.kv"}, *key)
        assert status == 400 and "checksum" in body["error"]["message"]
        (folder / "junk.kv").write_bytes(b"hello world")
        status, body = post(s, "/kv_sessions/restore", {"filename": "junk.kv"}, *key)
        assert status == 400 and "not a CortexStream KV session" in body["error"]["message"]
        status, body = post(s, "/kv_sessions/restore", {"filename": "ok.kv"}, *key)
        assert status == 200, body
    finally:
        assert s.stop() == 0
    off = Server()
    try:
        status, body = post(off, "/kv_sessions/save", {"filename": "x.kv", "prompt": "hi"})
        assert status == 400 and "--kv-session-dir" in body["error"]["message"]
    finally:
        assert off.stop() == 0


def chat(stdin: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN), "chat", "--model", str(MODEL), "--temperature", "0",
                           "--max-tokens", "24", *args], input=stdin, capture_output=True,
                          text=True, timeout=300, cwd=REPO)
    return proc


def test_chat_session_resumes_the_conversation_and_its_kv(tmp_path):
    session = tmp_path / "chat.kv"
    first = chat("What is the capital of France?\n", "--session", str(session))
    assert first.returncode == 0, first.stderr
    assert session.exists()
    second = chat("And of Italy?\n", "--session", str(session))
    assert second.returncode == 0, second.stderr
    assert "resumed" in second.stderr and "2 messages" in second.stderr
    resumed_tokens = int(second.stderr.split("messages, ")[1].split(" tokens")[0])
    assert resumed_tokens >= 16
    both = chat("What is the capital of France?\nAnd of Italy?\n")
    assert both.returncode == 0, both.stderr
    assert first.stdout + second.stdout == both.stdout
    # A damaged session file stops chat with the reason instead of being trusted.
    data = bytearray(session.read_bytes())
    data[-1] ^= 0xFF
    session.write_bytes(bytes(data))
    bad = chat("Hi\n", "--session", str(session))
    assert bad.returncode != 0
    assert "checksum" in bad.stderr
