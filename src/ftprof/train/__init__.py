"""Fine-tuning through HF Trainer + DeepSpeed: arguments (every ``TrainingArguments`` flag plus ftprof's), data
(classification and causal-LM text), models and the tokenizers trained offline for them, LoRA adapters
through peft (:mod:`~ftprof.train.adapters`), eval metrics, and
:mod:`~ftprof.train.recipe`, the one function that builds model, tokenizer, data, collator and Trainer for both
``ftprof train`` and a sweep point.

Entry: :func:`ftprof.train.run.main` (``ftprof train``, ``launch/train.py``).
"""
