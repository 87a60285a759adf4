#!/usr/bin/env bash
# Installs everything CortexStream needs to build, run and test (Debian 12, as root).
# Idempotent and non-interactive; the run and test scripts call it first.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

apt_packages=(
  build-essential cmake pkg-config git ca-certificates
  libcli11-dev nlohmann-json3-dev libpcre2-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  clang-14 libclang-rt-14-dev
  curl python3-pip
  libboost-dev libssl-dev openssl
  libzmq3-dev cppzmq-dev libmsgpack-cxx-dev
  libhiredis-dev libxxhash-dev redis-server
)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# Python packages for the tests' independent references and the benchmarks' peers.
# note: Debian's own python3 refuses system-wide pip installs (PEP 668); this machine is a
# dedicated build/test host, so we allow them.
PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --quiet --disable-pip-version-check -r "$root/tests/python/requirements.txt"
