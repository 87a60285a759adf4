"""An independent pure-Python SentencePiece ("llama") tokenizer over a GGUF vocabulary, written
from the algorithm llama.cpp documents for its SPM tokenizer, to cross-check the C++ one on random
strings (tests/python/test_tokenizer_spm.py).

  - special tokens are cut out first: control and unknown ones only when parsing specials,
    user-defined ones always; longer texts first, each taking its leftmost non-overlapping
    occurrences in the raw text left so far;
  - each raw fragment: a space in front when add_space_prefix and the fragment starts the text or
    follows a special token; spaces become U+2581; the text is split into UTF-8 characters (by
    the first byte's length) and the adjacent pair whose joined text is a vocabulary entry with
    the highest score is merged first (ties: leftmost), until no pair is an entry;
  - a symbol that is no entry becomes one <0xXX> token per byte.

This is a straightforward O(n^2) implementation: fine for short strings only.
"""
from __future__ import annotations

import struct

import numpy as np

CONTROL, USER_DEFINED, UNKNOWN = 3, 4, 2

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}
_ARRAYS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
           10: "<u8", 11: "<i8", 12: "<f8"}


def read_gguf_metadata(path: str) -> dict:
    """The key/value metadata of a GGUF file (a small reader of its own: gguf.GGUFReader takes
    tens of seconds over a 262k-entry vocabulary)."""
    with open(path, "rb") as f:
        head = f.read(24)
        if head[:4] != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file")
        _, _, n_kv = struct.unpack_from("<IQQ", head, 4)
        buf = f.read(64 << 20)  # the metadata comes first; 64 MiB holds any vocabulary
    pos = 0

    def take(fmt: str):
        nonlocal pos
        v = struct.unpack_from(fmt, buf, pos)[0]
        pos += struct.calcsize(fmt)
        return v

    def string() -> bytes:
        nonlocal pos
        n = take("<Q")
        pos += n
        return buf[pos - n:pos]

    def value(t: int):
        nonlocal pos
        if t == 8:
            return string()
        if t == 9:
            et, n = take("<I"), take("<Q")
            if et == 8:
                return [string() for _ in range(n)]
            arr = np.frombuffer(buf, dtype=_ARRAYS[et], count=n, offset=pos)
            pos += arr.nbytes
            return arr
        return take(_SCALARS[t])

    meta = {}
    for _ in range(n_kv):
        key = string().decode()
        meta[key] = value(take("<I"))
    return meta


class SpmVocab:
    def __init__(self, path: str):
        meta = read_gguf_metadata(path)
        assert meta["tokenizer.ggml.model"] == b"llama"
        self.tokens = meta["tokenizer.ggml.tokens"]
        self.scores = meta["tokenizer.ggml.scores"].astype(np.float32).tolist()
        self.types = meta["tokenizer.ggml.token_type"].tolist()

        def flag(key: str, default: bool) -> bool:
            return bool(meta.get(key, default))

        def ident(key: str) -> int:
            return int(meta[key])

        self.add_space_prefix = flag("tokenizer.ggml.add_space_prefix", True)
        self.add_bos = flag("tokenizer.ggml.add_bos_token", True)
        self.bos = ident("tokenizer.ggml.bos_token_id")
        self.ids = {t: i for i, t in enumerate(self.tokens)}
        self.specials = [(t, i, self.types[i] in (CONTROL, UNKNOWN))
                         for i, t in enumerate(self.tokens)
                         if self.types[i] in (CONTROL, USER_DEFINED, UNKNOWN) and t]
        # note: "</s>" counts as a control token where it ends generation (as llama.cpp does).
        self.specials = [(t, i, c or t == b"</s>") for t, i, c in self.specials]
        self.specials.sort(key=lambda s: -len(s[0]))  # stable: ties keep id order

    def _partition(self, text: bytes, parse_special: bool) -> list:
        fragments: list = [text]  # bytes = raw text, int = token id
        for special, ident, control in self.specials:
            if control and not parse_special:
                continue
            out: list = []
            for frag in fragments:
                if isinstance(frag, int) or special not in frag:
                    out.append(frag)
                    continue
                parts = frag.split(special)
                for k, part in enumerate(parts):
                    if k:
                        out.append(ident)
                    if part:
                        out.append(part)
            fragments = out
        return fragments

    def _fragment(self, text: bytes) -> list[int]:
        symbols = []
        i = 0
        while i < len(text):
            n = min([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4][text[i] >> 4], len(text) - i)
            symbols.append(text[i:i + n])
            i += n
        while True:
            best = None
            for k in range(len(symbols) - 1):
                ident = self.ids.get(symbols[k] + symbols[k + 1])
                if ident is not None and (best is None or self.scores[ident] > best[0]):
                    best = (self.scores[ident], k)
            if best is None:
                break
            k = best[1]
            symbols[k:k + 2] = [symbols[k] + symbols[k + 1]]
        out = []
        for s in symbols:
            if s in self.ids:
                out.append(self.ids[s])
            else:
                out.extend(self.ids[b"<0x%02X>" % b] for b in s)
        return out

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        out = [self.bos] if add_special and self.add_bos else []
        after_special = True
        for frag in self._partition(text.encode("utf-8"), parse_special):
            if isinstance(frag, int):
                out.append(frag)
                after_special = True
                continue
            if self.add_space_prefix and after_special:
                frag = b" " + frag
            out.extend(self._fragment(frag.replace(b" ", "\u2581".encode())))
            after_special = False
        return out
