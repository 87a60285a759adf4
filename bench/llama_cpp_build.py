"""llama.cpp's tools for the benchmarks that compare with them, and facts about the run.

The llama.cpp source is the one vendored by the llama-cpp-python sdist pinned in
bench/requirements.txt, so every comparison uses one known llama.cpp version. The sdist is
fetched (`pip download --no-binary :all:`) into bench/.cache (git-ignored) and the tools are
built from it with CMake into bench/.cache/llama-build (Release, GGML_NATIVE=ON, LLAMA_CURL=OFF),
one target at a time, on first use: several minutes on two cores for the first one.

The benchmarks' other model formats are made here too: the default model re-quantized by
`llama-quantize --allow-requantize IN OUT TYPE` into bench/.cache/models/, once (requantized_model).

As a command:

  python3 bench/llama_cpp_build.py --build llama-bench,llama-batched-bench
  python3 bench/llama_cpp_build.py --quantize q4_0,q8_0 [--model M]

builds the named tools when missing, makes the named formats of the model when missing, and
prints one JSON object with their paths.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "bench" / "requirements.txt"
CACHE = ROOT / "bench" / ".cache"
LLAMA_BUILD_DIR = CACHE / "llama-build"
MODELS_CACHE = CACHE / "models"
DEFAULT_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
# The llama.cpp tools the benchmarks run (CMake target = executable name).
TOOLS = ("llama-perplexity", "llama-server", "llama-bench", "llama-batched-bench",
         "llama-quantize", "llama-tokenize")
# Model formats the benchmarks compare (all of them run on both engines): the name in a GGUF
# file name (SmolLM2-135M-Instruct.Q4_1.gguf) and llama-quantize's type name.
FORMATS = ("Q4_0", "Q4_1", "Q8_0")
LLAMA_CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
                     "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"]


def log(msg: str) -> None:
    print(f"[llama.cpp build {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def default_tool_path(target: str) -> Path:
    """Where build_llama_tool(target) puts the executable."""
    return LLAMA_BUILD_DIR / "bin" / target


def pinned_llama_cpp_python() -> str:
    """The llama-cpp-python version pinned in bench/requirements.txt."""
    for line in REQUIREMENTS.read_text().splitlines():
        m = re.match(r"\s*llama-cpp-python\s*==\s*([^\s#;]+)", line)
        if m:
            return m.group(1)
    raise RuntimeError(f"{REQUIREMENTS}: no pinned llama-cpp-python==VERSION line")


def llama_source() -> Path:
    """The vendored llama.cpp source tree, downloaded and unpacked into bench/.cache if needed."""
    version = pinned_llama_cpp_python()
    CACHE.mkdir(parents=True, exist_ok=True)
    sdist = CACHE / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.exists():
        log(f"downloading the llama-cpp-python {version} sdist into {CACHE}")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                        ":all:", f"llama-cpp-python=={version}", "-d", str(CACHE)], check=True,
                       stdout=sys.stderr)
    src = CACHE / f"llama_cpp_python-{version}"
    if not (src / "vendor" / "llama.cpp" / "CMakeLists.txt").exists():
        with tarfile.open(sdist) as tf:
            tf.extractall(CACHE)
    return src / "vendor" / "llama.cpp"


def build_llama_tool(target: str) -> dict:
    """Builds the llama.cpp CMake target `target` (e.g. llama-server, llama-perplexity) into
    LLAMA_BUILD_DIR, fetching the source first if needed. Returns the seconds spent fetching and
    building; raises CalledProcessError or RuntimeError when that fails."""
    t0 = time.perf_counter()
    # note: bench/.cache may be a link to a cache that several checkouts share; CMake gets the
    # real paths, so that every checkout reuses the one build instead of starting it afresh.
    src = llama_source().resolve()
    build_dir = LLAMA_BUILD_DIR.resolve()
    t1 = time.perf_counter()
    log(f"building {target} in {build_dir} (several minutes the first time)")
    subprocess.run(["cmake", "-S", str(src), "-B", str(build_dir)] + LLAMA_CMAKE_FLAGS,
                   check=True, stdout=sys.stderr)
    subprocess.run(["cmake", "--build", str(build_dir), "--target", target, "-j",
                    str(os.cpu_count() or 2)], check=True, stdout=sys.stderr)
    t2 = time.perf_counter()
    dest = default_tool_path(target)
    if not dest.exists():
        raise RuntimeError(f"built, but {dest} is not there")
    return {"fetch_s": round(t1 - t0, 1), "build_s": round(t2 - t1, 1)}


def llama_version(binary: Path) -> str | None:
    """What `binary --version` says about its version and build, or None."""
    try:
        p = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
        text = (p.stdout + p.stderr).strip()
        lines = [l for l in text.splitlines() if l.startswith("version") or "built with" in l]
        return "; ".join(lines) or text[-200:]
    except (OSError, subprocess.TimeoutExpired):
        return None


def llama_vendor_commit() -> str | None:
    """The llama.cpp commit the pinned llama-cpp-python release vendors (from its CHANGELOG)."""
    try:
        version = pinned_llama_cpp_python()
        log_text = (CACHE / f"llama_cpp_python-{version}" / "CHANGELOG.md").read_text()
    except (OSError, RuntimeError):
        return None
    m = re.search(r"update llama\.cpp to [\w-]+/llama\.cpp@([0-9a-f]+)", log_text)
    return m.group(1) if m else None


def llama_info(binary: Path) -> dict:
    """What to report about the llama.cpp build a benchmark used."""
    return {"binary": str(binary), "version": llama_version(binary),
            "vendored_commit": llama_vendor_commit(),
            "llama_cpp_python": pinned_llama_cpp_python(),
            "cmake_flags": LLAMA_CMAKE_FLAGS}


def git_commit() -> str | None:
    """This checkout's short commit, with -dirty when tracked files are modified."""
    try:
        c = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                           capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain",
                                "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return c + ("-dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def cpu_name() -> str:
    """The CPU's model name as /proc/cpuinfo gives it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def ensure_llama_tool(target: str) -> tuple[Path, dict | None]:
    """The llama.cpp tool `target` (one of TOOLS) at its default path, built first when it is
    missing. Returns the path and the build's report (build_llama_tool), None when it was there."""
    if target not in TOOLS:
        raise RuntimeError(f"unknown llama.cpp tool {target!r}; known: {', '.join(TOOLS)}")
    path = default_tool_path(target)
    if path.exists():
        return path, None
    return path, build_llama_tool(target)


def model_format(path: Path) -> str | None:
    """The weight format a GGUF file name states (NAME.Q4_1.gguf -> "Q4_1"), or None."""
    m = re.search(r"\.(Q4_0|Q4_1|Q8_0|F16|BF16|F32)\.gguf$", path.name, re.IGNORECASE)
    return m.group(1).upper() if m else None


def requantized_model(src: Path, qtype: str) -> Path:
    """`src` re-quantized to `qtype` (Q4_0, Q8_0, ...) as bench/.cache/models/STEM.QTYPE.gguf,
    made on first use with `llama-quantize --allow-requantize SRC OUT QTYPE` (llama-quantize is
    built first when missing) and kept while it is newer than `src`. The new file's weights carry
    the rounding of both formats, which does not matter for speed: every tensor has the shape and
    the type a direct quantization would give."""
    qtype = qtype.upper()
    stem = re.sub(r"\.(Q4_0|Q4_1|Q8_0|F16|BF16|F32)$", "", src.stem, flags=re.IGNORECASE)
    out = MODELS_CACHE / f"{stem}.{qtype}.gguf"
    if out.exists() and out.stat().st_mtime >= src.stat().st_mtime:
        return out
    quantize, _ = ensure_llama_tool("llama-quantize")
    MODELS_CACHE.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".gguf.tmp")
    log(f"llama-quantize --allow-requantize {src} {out} {qtype}")
    p = subprocess.run([str(quantize), "--allow-requantize", str(src), str(tmp), qtype],
                       capture_output=True, text=True)
    if p.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama-quantize exited with {p.returncode}: "
                           f"{(p.stdout + p.stderr).strip()[-2000:]}")
    tmp.replace(out)
    return out


def model_for_format(src: Path, fmt: str) -> Path:
    """The model file to benchmark `fmt` with: `src` itself when its name states that format,
    else `src` re-quantized (requantized_model)."""
    fmt = fmt.upper()
    if fmt not in FORMATS:
        raise RuntimeError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    return src if model_format(src) == fmt else requantized_model(src, fmt)


def parse_formats(text: str) -> list[str]:
    """`q4_1,q4_0` -> ["Q4_1", "Q4_0"]; RuntimeError for an unknown one."""
    out = [f.strip().upper() for f in text.split(",") if f.strip()]
    bad = [f for f in out if f not in FORMATS]
    if bad or not out:
        raise RuntimeError(f"--formats: unknown {', '.join(bad) or '(empty)'}; known: "
                           f"{', '.join(f.lower() for f in FORMATS)}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--build", default="",
                    help=f"comma-separated tools to build when missing ({', '.join(TOOLS)})")
    ap.add_argument("--quantize", default="",
                    help="comma-separated formats of --model to make when missing "
                         f"({', '.join(f.lower() for f in FORMATS)})")
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="the model to re-quantize")
    args = ap.parse_args()
    out: dict = {"tools": {}, "models": {}}
    try:
        for target in [t.strip() for t in args.build.split(",") if t.strip()]:
            path, built = ensure_llama_tool(target)
            out["tools"][target] = {"path": str(path), "built": built}
        if args.quantize:
            if not args.model.exists():
                raise RuntimeError(f"{args.model}: not found (scripts/fetch_model.sh fetches the "
                                   "default model)")
            for fmt in parse_formats(args.quantize):
                out["models"][fmt.lower()] = str(model_for_format(args.model, fmt))
    except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
        log(f"error: {e}")
        return 1
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
