"""Fine-tune a transformers model (text classification or causal LM, all weights or LoRA) with HF Trainer + DeepSpeed.

    deepspeed launch/train.py --ds_config ds_configs/zero2.json --model bert-base-uncased --dataset imdb \\
        --per_device_train_batch_size 16 --num_train_epochs 2 --bf16 --output_dir outputs/imdb-bert
    deepspeed --num_gpus 2 launch/train.py --ds_config ds_configs/zero3.json ...      # several GPUs / ranks
    torchrun --nproc_per_node 2 launch/train.py --ds_config ds_configs/zero2.json ... # torchrun works too
    python launch/train.py --model tiny-bert --dataset synthetic --ds_config ds_configs/zero2.json  # no network

Every TrainingArguments flag works under its HF name; `python launch/train.py --help` lists them all.
The logic lives in ftprof.train.run (also installed as `ftprof train`).
"""

from ftprof.cli.train import main

if __name__ == "__main__":
    raise SystemExit(main())
