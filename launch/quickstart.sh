#!/usr/bin/env bash
# Set up (if needed) and run the no-network main job: a tiny BERT learns a synthetic sentiment task under
# DeepSpeed ZeRO-2 on this machine's CPU or GPU. Ends with eval accuracy (~0.98) in outputs/quickstart/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
exec .venv/bin/python launch/train.py --model tiny-bert --dataset synthetic --ds_config ds_configs/zero2.json \
  --num_train_epochs 3 --per_device_train_batch_size 32 --learning_rate 1e-3 --warmup_steps 20 \
  --output_dir outputs/quickstart --overwrite_output_dir --disable_tqdm true "$@"
