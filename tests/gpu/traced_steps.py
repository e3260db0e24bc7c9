"""Run, for real, the steps ``ftprof estimate --trace`` predicts, and print the allocator's peaks as JSON.

    python tests/gpu/traced_steps.py MODEL TASK PRECISION BATCH SEQ OPTIM

One process per case (a fresh CUDA context: no workspace or cached block of an earlier case). The model is built
as the trace builds it (random weights, fp32, SDPA, dropout on), moved to the device, then the peaks are reset
and three steps run as HF Trainer runs them without DeepSpeed: forward and loss (under autocast for bf16/fp16),
backward, AdamW over the Trainer's two groups, zero_grad. The batch is padded (one pad in the first row), as
the trace assumes. On a CPU it runs the same steps and prints no peaks (a rehearsal of the script).
"""

from __future__ import annotations

import contextlib
import json
import sys

import torch

from ftprof.estimate.trace import DTYPES, _adamw, batch_factory, known_model_factory, model_config
from ftprof.estimate.traced import TRACE_STEPS, TRACED_OPTIMIZERS


def main(model: str, task: str, precision: str, batch: int, seq: int, optim: str) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    net = known_model_factory(model, task, "fp32", "sdpa")().to(device)  # type: ignore[arg-type]
    inputs = {
        k: v.to(device) for k, v in batch_factory(int(model_config(model).vocab_size), batch, seq, task, True)().items()
    }
    inputs["attention_mask"][0, -1] = 0  # padded: transformers builds the mask, as on fake tensors
    opt = _adamw(net, TRACED_OPTIMIZERS[optim], trainer_groups=True)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    autocast = torch.autocast(device, DTYPES[precision]) if precision != "fp32" else contextlib.nullcontext()
    for step in range(TRACE_STEPS):
        if step:
            net.zero_grad(set_to_none=True)
        with autocast:
            loss = net(**inputs).loss
        loss.backward()
        del loss  # as the trace does, before the step
        opt.step()
    if device != "cuda":
        return {"device": device, "allocated": None, "reserved": None}
    torch.cuda.synchronize()
    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "allocated": torch.cuda.max_memory_allocated(),
        "reserved": torch.cuda.max_memory_reserved(),
    }


if __name__ == "__main__":
    name, task, precision, batch, seq, optim = sys.argv[1:7]
    print(json.dumps(main(name, task, precision, int(batch), int(seq), optim)))
