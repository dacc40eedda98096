#!/usr/bin/env bash
# The GPU machine's one command (no SGLang there, no network): install the kit carried in
# .gpu-kit/ and the project into a venv under /tmp, then the end-to-end, serving and
# compression-cost checks within 9 minutes; gpu_kit.json and gpu_kit.md land in OUT.
# Usage, from anywhere: bash benchmarks/gpu_kit.sh OUT [gpu_kit.py run flags]   (OUT defaults
# to $OUT). Details: python3 benchmarks/gpu_kit.py --help, benchmarks/README.md.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:?usage: bash benchmarks/gpu_kit.sh OUT_DIR [flags] (or set OUT)}}
shift || true
exec python3 benchmarks/gpu_kit.py run --out "$out" "$@"
