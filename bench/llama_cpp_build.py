"""llama.cpp's tools for the benchmarks that compare with them, and facts about the run.

The llama.cpp source is the one vendored by the llama-cpp-python sdist pinned in
bench/requirements.txt, so every comparison uses one known llama.cpp version. The sdist is
fetched (`pip download --no-binary :all:`) into bench/.cache (git-ignored) and the tools are
built from it with CMake into bench/.cache/llama-build (Release, GGML_NATIVE=ON, LLAMA_CURL=OFF),
one target at a time, on first use: several minutes on two cores for the first one.
"""
from __future__ import annotations

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
    src = llama_source()
    t1 = time.perf_counter()
    log(f"building {target} in {LLAMA_BUILD_DIR} (several minutes the first time)")
    subprocess.run(["cmake", "-S", str(src), "-B", str(LLAMA_BUILD_DIR)] + LLAMA_CMAKE_FLAGS,
                   check=True, stdout=sys.stderr)
    subprocess.run(["cmake", "--build", str(LLAMA_BUILD_DIR), "--target", target, "-j",
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
