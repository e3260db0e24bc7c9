"""The measured breakdown against values known by construction (no DeepSpeed here: see the integration tests)."""

from dataclasses import dataclass, field

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from ftprof.profiler import ProfilerCallback
from ftprof.profiler.breakdown import SavedActivationMeter, model_state_bytes
from tests.profiler.test_callback import make_trainer

F32 = 4


def test_saved_activations_of_a_small_mlp_count_each_storage_once():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)).train()
    meter = SavedActivationMeter()
    meter.attach(model)
    x = torch.randn(5, 8)
    model(x).sum().backward()
    # Linear 1 saves its input (5 x 8); ReLU saves its output (5 x 16), which Linear 2 saves again as its
    # input: the same storage, counted once. Weights are parameters: not activations.
    assert meter.saved_bytes == 5 * 8 * F32 + 5 * 16 * F32
    model(x)  # only the first training forward is measured; the hooks are gone
    assert meter.saved_bytes == 5 * 8 * F32 + 5 * 16 * F32
    assert not meter._handles


def test_no_grad_and_eval_forwards_are_not_measured():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU())
    meter = SavedActivationMeter()
    meter.attach(model)
    model.eval()(torch.randn(2, 8))
    with torch.no_grad():
        model.train()(torch.randn(2, 8))
    assert meter.saved_bytes is None
    model(torch.randn(3, 8))
    assert meter.saved_bytes == 3 * 8 * F32 + 3 * 16 * F32


def bert(checkpointing: bool) -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64
    )
    model = BertForSequenceClassification(config).train()
    if checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()  # transformers 5's name, or 4's
    return model


def saved(model, ids) -> int:
    meter = SavedActivationMeter()
    meter.attach(model)
    model(input_ids=ids, labels=torch.zeros(ids.shape[0], dtype=torch.long)).loss.backward()
    assert meter.saved_bytes is not None
    return meter.saved_bytes


def test_checkpointing_keeps_only_each_layers_input():
    b, s, h, layers = 4, 24, 32, 3
    ids = torch.randint(1, 100, (b, s))
    full = saved(bert(False), ids)
    plain = bert(False)  # a second run measures what each layer saves (meters don't nest: inner hooks win)
    per_layer = [SavedActivationMeter() for _ in plain.bert.encoder.layer]
    for meter, layer in zip(per_layer, plain.bert.encoder.layer, strict=True):
        meter.attach(layer)
    plain(input_ids=ids)
    inside_layers = sum(m.saved_bytes for m in per_layer)
    ckpt = bert(True)
    # With checkpointing, each layer holds its input (b x s x h fp32) instead of what it would have saved.
    assert saved(ckpt, ids) == full - inside_layers + layers * b * s * h * F32
    assert saved(ckpt, ids) < full


def test_plain_trainer_breakdown_matches_the_model_and_adam(tmp_path):
    trainer = make_trainer(tmp_path)
    profiler = ProfilerCallback(warmup_steps=1)
    trainer.add_callback(profiler)
    trainer.train()
    (rank,) = profiler.profile.ranks
    params = sum(p.numel() for p in trainer.model.parameters()) * F32
    b = rank.breakdown
    assert b["parameters_fp32"] == params
    assert b["gradients"] == params  # every parameter's .grad, read before the first step
    assert b["master_weights"] == 0  # torch's AdamW steps the model's own parameters
    assert b["optimizer_states"] == 2 * params  # exp_avg + exp_avg_sq
    assert b["saved_activations"] > 0
    assert rank.levers == {
        "gradient_checkpointing": False,
        "offload_optimizer": False,
        "offload_param": False,
        "optimizer": "AdamW",
        "optimizer_impl": "fused" if trainer.args.optim == "adamw_torch_fused" else "auto",
    }


def test_model_state_bytes_counts_a_shared_storage_once():
    model = torch.nn.Linear(4, 4)
    flat = torch.zeros(20)  # DeepSpeed-style: parameters are views into one flat buffer
    model.weight.data = flat[:16].view(4, 4)
    model.bias.data = flat[16:]
    assert model_state_bytes(model, None) == {
        "parameters_fp32": 20 * F32,
        "master_weights": 0,
        "gradients": 0,
        "gradient_buckets": 0,
        "other_buffers": 0,
    }


@dataclass
class Bucket:  # as DeepSpeed's IPGBucket: a dataclass holding its buffers in a list
    buffer: list = field(default_factory=list)
    params: list = field(default_factory=list)


class ZeroLike:
    """DeepSpeed's ZeRO-1/2 optimizer's layout, by attribute name, around a real torch optimizer."""

    def __init__(self, model):
        flat = torch.zeros(20, dtype=torch.bfloat16)
        model.weight.data, model.bias.data = flat[:16].view(4, 4), flat[16:]
        self.bit16_groups_flat = [flat]  # the parameters' own buffer: counted once, as parameters
        self.single_partition_of_fp32_groups = [torch.zeros(20, requires_grad=True)]
        self.optimizer = torch.optim.AdamW(self.single_partition_of_fp32_groups)
        self.averaged_gradients = {0: [torch.zeros(20, dtype=torch.bfloat16)]}
        self.ipg_buckets = {
            torch.bfloat16: Bucket(buffer=[torch.zeros(7, dtype=torch.bfloat16)], params=[model.weight])
        }
        self.staging = torch.zeros(5)  # anything else it holds
        self.placeholder = torch.empty(1000, device="meta")  # holds no memory (ZeRO-2 keeps one): not counted
        self.fp16_groups = [[model.weight, model.bias]]  # parameters again: not buffers


def test_deepspeed_style_optimizer_items_by_attribute():
    model = torch.nn.Linear(4, 4)
    zero = ZeroLike(model)
    zero.single_partition_of_fp32_groups[0].grad = torch.zeros(20)
    zero.optimizer.step()  # creates the Adam moments
    items = model_state_bytes(model, zero)
    assert items == {
        "parameters_bf16": 20 * 2,
        "master_weights": 20 * F32,
        "optimizer_states": 2 * 20 * F32,
        "gradients": 20 * 2 + 20 * F32,  # averaged bf16 partition + the fp32 master's .grad
        "gradient_buckets": 7 * 2,
        "other_buffers": 5 * F32,
    }


def test_a_forward_that_raises_is_not_measured_and_leaves_no_hooks_pushed():
    class FailsOnce(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear, self.failed = torch.nn.Linear(8, 16), False

        def forward(self, x):
            y = torch.relu(self.linear(x))
            if not self.failed:
                self.failed = True
                raise RuntimeError("out of memory")  # as an OOM retry would see it
            return y

    model = FailsOnce().train()
    meter = SavedActivationMeter()
    meter.attach(model)
    with pytest.raises(RuntimeError):
        model(torch.randn(9, 8))
    assert meter.saved_bytes is None
    assert meter._context is None
    model(torch.randn(3, 8))  # measured: input (3 x 8) and the ReLU output (3 x 16), not the failed batch
    assert meter.saved_bytes == 3 * 8 * F32 + 3 * 16 * F32
