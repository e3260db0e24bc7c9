"""ftprof: fine-tune Hugging Face transformers with DeepSpeed ZeRO, and measure what fits."""

__version__ = "0.1.0"
