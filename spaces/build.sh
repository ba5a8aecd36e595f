#!/usr/bin/env bash
# Assemble a Hugging Face Space from this repository: spaces/build.sh OUT_DIR
set -euo pipefail
out=${1:?usage: spaces/build.sh OUT_DIR}
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
cp "$root/spaces/README.md" "$out/README.md"
cp "$root/spaces/requirements.txt" "$out/requirements.txt"
cp "$root/app.py" "$out/app.py"
rm -rf "$out/ovseg" "$out/assets"
cp -r "$root/ovseg" "$out/ovseg"
cp -r "$root/assets" "$out/assets"
find "$out/ovseg" -name '__pycache__' -prune -exec rm -rf {} +
echo "Space assembled in $out; push it with git to your Space repository."
