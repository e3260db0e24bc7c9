#!/usr/bin/env bash
# Set up (if needed) and run the no-network main job: an ftprof sweep of a tiny BERT over batch size,
# sequence length and ZeRO stage on this machine (8 points, ~2 minutes on a 2-core CPU; the full grid on a
# GPU), ending with its report. Results go to a new folder under outputs/, so nothing earlier is touched.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
# The DeepSpeed ops setup.sh built (a venv of its own: another venv's sources would rebuild them in ~/.cache).
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}
exec .venv/bin/ftprof sweep --model tiny-bert --out "outputs/quickstart-$(date +%Y%m%d-%H%M%S)" "$@"
