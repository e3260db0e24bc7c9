"""``ftprof estimate --trace``: the GPU's kernels run on CPU tensors save what a GPU saves (hand-worked byte
counts), autocast's casts are traced, fake and real runs agree under both, AdamW's host-side step counts stay
out, the cuBLAS workspaces follow torch's source per version, and the traced estimate meets issue 22's goals on
the published GPU runs and on ftprof's own H200 point (never fitted to; the bench prints the same table)."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ftprof.cli.estimate import main
from ftprof.estimate.calibration import SHIPPED_GPU
from ftprof.estimate.trace import StepRun, Trace, batch_factory, known_model_factory, trace_training_step
from ftprof.estimate.traced import MIB, cublas_workspaces, traced_estimate
from ftprof.point import Point
from tests.conftest import ROOT

TRUTH = ROOT.parent / "shared" / "data" / "gpu-truth" / "optimum-benchmark.jsonl"


@pytest.fixture(autouse=True)
def no_saved_calibration(monkeypatch, tmp_path):
    """The CLI loads the shipped GPU constants, not a calibration saved on this machine."""
    monkeypatch.setenv("FTPROF_HOME", str(tmp_path / "ftprof"))


class Tiny(torch.nn.Module):
    """A Linear with bias, then ``dropout`` (a module) or scaled dot-product attention with dropout."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.linear = torch.nn.Linear(8, 8)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> SimpleNamespace:
        y = self.linear(x)
        if self.kind == "dropout":
            y = self.drop(y)
        else:  # batch 1, 2 heads, 4 positions, head dim 4 (x is 4 x 8); dropout_p by keyword or position
            q = y.view(1, 4, 2, 4).transpose(1, 2)
            if self.kind == "sdpa":
                y = torch.nn.functional.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
            else:
                y = torch.nn.functional.scaled_dot_product_attention(q, q, q, None, 0.5)
        return SimpleNamespace(loss=y.float().sum())


def tiny_trace(kind: str, gpu: bool, autocast: str | None = None, fake: bool = True) -> Trace:
    run = StepRun(autocast=autocast, gpu=gpu)
    return trace_training_step(lambda: Tiny(kind).train(), lambda: {"x": torch.ones(4, 8)}, "fused", fake, run)


def saved_by_op(trace: Trace) -> dict[str, int]:
    saved: dict[str, int] = {}
    for s in trace.storages:
        if s.category == "activation":
            saved[s.op] = saved.get(s.op, 0) + s.nbytes
    return saved


@pytest.mark.parametrize("fake", [True, False])
def test_dropout_saves_a_bool_mask_as_on_a_gpu_and_the_cpus_mask_without(fake):
    """4 x 8 fp32 through dropout: the CPU saves a mask in fp32 (128 B); CUDA's fused dropout a bool one (32 B)."""
    cpu, gpu = tiny_trace("dropout", False, fake=fake), tiny_trace("dropout", True, fake=fake)
    assert saved_by_op(gpu) == {"native_dropout": 32}
    cpu_masks = [s for s in cpu.storages if s.category == "activation"]
    assert [s.nbytes for s in cpu_masks] == [128]  # empty_like(x).bernoulli_(): the mask in x's dtype
    assert cpu.saved_bytes - gpu.saved_bytes == 96


@pytest.mark.parametrize("kind", ["sdpa", "sdpa_positional"])
@pytest.mark.parametrize("fake", [True, False])
def test_sdpa_with_dropout_keeps_a_log_sum_exp_as_on_a_gpu_not_the_probabilities(fake, kind):
    """Batch 1, 2 heads, 4 positions: CUDA's flash and memory-efficient kernels save the output (the input
    shape, 128 B in fp32) and an fp32 log-sum-exp of 1 x 2 x 4 (32 B); the CPU's math path (its only one with
    dropout) saves the 2 x 4 x 4 probabilities and their mask too."""
    cpu, gpu = tiny_trace(kind, False, fake=fake), tiny_trace(kind, True, fake=fake)
    flash = saved_by_op(gpu)
    assert flash.pop("_scaled_dot_product_flash_attention_for_cpu") == 128 + 32
    assert sum(flash.values()) == 128  # the linear's output: q, k and v (one tensor here), kept for the kernel
    assert "_scaled_dot_product_flash_attention_for_cpu" not in saved_by_op(cpu)
    assert cpu.saved_bytes > gpu.saved_bytes + 2 * 4 * 4 * 4  # at least the probabilities and their mask


@pytest.mark.parametrize("fake", [True, False])
def test_autocast_traces_the_16_bit_copies_the_linear_saves(fake):
    """Linear(8, 8) on a 4 x 8 fp32 input under bf16 autocast: the bf16 copies of input (64 B), weight (128 B)
    and bias (16 B), the bf16 output (64 B). addmm saves the input's copy for the weight's gradient; the
    weight's copy would be saved for the input's gradient, which this input (no grad) doesn't need: autocast's
    cache holds it until the forward leaves autocast."""
    trace = tiny_trace("dropout", True, "bf16", fake=fake)
    copies = {s.nbytes: s for s in trace.storages if s.op == "_to_copy" and s.phase == "forward"}
    assert sorted(copies)[:3] == [16, 64, 128]
    assert [s.nbytes for s in trace.storages if s.category == "activation" and s.op == "_to_copy"] == [64]
    weight_copy = copies[128]
    freed_at = trace.events.index(("free", weight_copy.id))
    assert freed_at < trace.phase_starts["backward"]  # the cache, emptied as the forward ends
    dropped = [s for s in trace.storages if s.op == "native_dropout" and s.phase == "forward"]
    assert sorted(s.nbytes for s in dropped) == [32, 64]  # a bool mask and the bf16 output
    fp32 = tiny_trace("dropout", True, None, fake=fake)
    assert not [s for s in fp32.storages if s.op == "_to_copy" and s.phase == "forward" and s.nbytes in (64, 128)]


def runs_of_frees(trace: Trace) -> list[object]:
    out: list[object] = []
    for event in trace.events:
        if event[0] == "free" and out and isinstance(out[-1], set):
            out[-1].add(event[1])
        else:
            out.append({event[1]} if event[0] == "free" else tuple(event))
    return out


def test_fake_and_real_gpu_mode_steps_agree_on_a_model_from_the_hub_zoo():
    """Three steps of tiny-bert with the GPU's kernels, autocast and the Trainer's groups: same events. (Without
    an attention mask: a real run looks at its values, which a fake one can't, as the next test shows.)"""
    factory = known_model_factory("tiny-bert")
    batch = batch_factory(1024, 4, 32)
    run = StepRun(steps=3, autocast="bf16", gpu=True, trainer_groups=True)
    fake = trace_training_step(factory, batch, "foreach", True, run)
    real = trace_training_step(factory, batch, "foreach", False, run)
    # autocast's cache frees its weight copies at once, in its hash map's order (addresses): compare each run of
    # frees as a set (the allocator's blocks after the run don't depend on the order)
    assert runs_of_frees(fake) == runs_of_frees(real)
    assert fake.peak == real.peak > 0
    assert [phase for _, phase in fake.bounds].count("forward") == 3


def test_a_fake_padded_batch_builds_the_mask_sdpa_takes_in_every_layer():
    """Under fake tensors transformers can't see that a mask is all ones, so it builds the mask a padded batch
    gets: SDPA converts it to a float bias per layer (tiny-bert: 2 layers, 4 x 1 x 32 x 32 fp32 each)."""
    factory, run = known_model_factory("tiny-bert"), StepRun(gpu=True)
    bare = trace_training_step(factory, batch_factory(1024, 4, 32), run=run)
    padded = trace_training_step(factory, batch_factory(1024, 4, 32, attention_mask=True), run=run)
    assert padded.saved_bytes - bare.saved_bytes == 2 * 4 * 32 * 32 * 4


def test_a_gpu_step_keeps_adamws_step_counts_on_the_host_except_fused():
    """Outside its fused path AdamW's ``step`` is a CPU scalar even for CUDA parameters: not in the trace."""
    factory, batch = known_model_factory("tiny-bert"), batch_factory(1024, 2, 16)
    params = sum(p.numel() * 4 for p in factory().parameters())
    tensors = len(list(factory().parameters()))
    foreach = trace_training_step(factory, batch, "foreach", run=StepRun(gpu=True))
    fused = trace_training_step(factory, batch, "fused", run=StepRun(gpu=True))
    assert foreach.category_bytes("optimizer_state") == 2 * params
    assert fused.category_bytes("optimizer_state") == 2 * params + 4 * tensors
    assert len(foreach.host) == tensors
    assert all(event[1] not in foreach.host for event in foreach.events)


def test_the_workspaces_follow_torchs_source_per_version():
    hopper = cublas_workspaces("h100-80gb", "2.11.0+cu130")
    assert (hopper.forward, hopper.backward) == ((32 * MIB, MIB), (32 * MIB,))
    assert cublas_workspaces("a10g-24gb", "2.3.1+cu121").backward == (8 * MIB + 128 * 1024,)  # CUDA < 12.2
    assert cublas_workspaces("a10g-24gb", "2.3.1+cu124").backward == ()  # pytorch#113994, until 2.4
    assert cublas_workspaces("a10g-24gb", "2.4.1+cu124").backward == (8 * MIB + 128 * 1024,)  # #124250
    assert cublas_workspaces("gpu", "2.5.1+rocm6.2").backward == ()
    assert cublas_workspaces("gpu", "2.6.0+rocm6.2").backward == (32 * MIB,)  # #138791


def test_the_traced_estimate_itemises_its_allocated_peak():
    point = Point(precision="bf16", zero=0, seq_len=64, batch_size=4, deepspeed=False)
    est = traced_estimate("tiny-bert", "classification", point, "adamw_torch", SHIPPED_GPU, "h100-80gb")
    assert sum(est.items.values()) == est.allocated <= est.reserved < est.device_used
    ws = cublas_workspaces("h100-80gb")  # the installed torch's
    assert est.items["gpu_workspaces"] == sum(ws.forward) + sum(ws.backward)
    assert est.items["optimizer_states"] == 2 * 4 * sum(
        p.numel() for p in known_model_factory("tiny-bert")().parameters()
    )


def published_cases() -> list[dict]:
    if not TRUTH.exists():
        pytest.fail(f"{TRUTH}: the shared GPU measurements are missing")
    return [json.loads(line) for line in TRUTH.read_text().splitlines() if line.strip()]


def test_the_traced_estimate_meets_the_goals_on_published_gpu_runs():
    """Issue 22's goals (allocated within 2%, reserved 5%, NVML used 10%) on every published run ftprof can
    express, with the workspaces of the torch each names; nothing here was fitted to them."""
    import bench.bench_public_gpu as bench

    rows = [
        row
        for case in published_cases()
        if not isinstance(w := bench.expressible(case), str)
        for row in bench.judge_traced(case, *w)
    ]
    assert len(rows) == 3, rows  # gpt2 and roberta-base on the MI250, roberta-base on the A10G
    for row in rows:
        assert row["allocated"] is None or abs(row["allocated"]) < 0.02, row
        assert abs(row["reserved"]) < 0.05, row
        assert row["nvml"] is None or abs(row["nvml"]) < 0.10, row


def test_the_traced_estimate_of_ftprofs_own_h200_plain_trainer_point():
    """bert-base, bf16 autocast, fused AdamW, 32 x 128 on the H200 (measured 2026-12-04): within the goals."""
    import bench.bench_public_gpu as bench

    row = bench.judge_own_h200()
    assert abs(row["allocated"]) < 0.02, row
    assert abs(row["reserved"]) < 0.05, row


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--zero", "none", "--cpu"], "drop --trace"),
        (["--zero", "none", "--optim", "sgd"], "--optim adamw_torch or adamw_torch_fused"),
        (["--zero", "none", "--world_size", "2"], "without DDP"),
        (["--zero", "none", "--peft", "lora"], "--peft lora"),
        (["--zero", "2", "--peft", "lora"], "--peft lora"),
        (["--zero", "none,2", "--seq_len", "4096"], "512 positions"),
        (["--model", "tiny-roberta", "--zero", "none", "--seq_len", "513"], "512 positions"),
    ],
)
def test_trace_refuses_what_it_does_not_trace_in_one_line(capsys, extra, message):
    assert main(["--model", "tiny-bert", "--trace", *extra]) == 2  # a later --model wins
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_trace_estimates_plain_bf16_beside_a_deepspeed_stage_as_json(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    flags = ["--model", "tiny-bert", "--zero", "none,2", "--precision", "bf16", "--batch_size", "4", "--seq_len", "64"]
    assert main([*flags, "--trace", "--gpu", "h100-80gb", "--format", "json"]) == 0
    plain, zero2 = json.loads(capsys.readouterr().out)["settings"]
    assert plain["key"] == "bf16-znone-w1-ga1-s64-b4"
    ws = cublas_workspaces("h100-80gb")
    assert plain["items"]["gpu_workspaces"] == sum(ws.forward) + sum(ws.backward)
    assert "gpu_workspaces" not in zero2["items"]
    # the DeepSpeed setting: the traced forward's saved activations in the formulas' place, the rest formulas
    from ftprof.estimate.architecture import arch_for
    from ftprof.estimate.estimator import estimate
    from ftprof.estimate.traced import traced_saved_activations

    ds_point = Point(precision="bf16", zero=2, seq_len=64, batch_size=4)
    saved = traced_saved_activations("tiny-bert", "classification", ds_point)
    assert zero2["saved_activation_parts"] == saved
    formula = estimate(arch_for("tiny-bert"), ds_point, SHIPPED_GPU, "gpu", saved_parts=saved)
    assert zero2["allocated_bytes"] == formula.allocated
    point = Point(precision="bf16", zero=0, seq_len=64, batch_size=4, deepspeed=False)
    est = traced_estimate("tiny-bert", "classification", point, "adamw_torch_fused", SHIPPED_GPU, "h100-80gb")
    assert (plain["allocated_bytes"], plain["reserved_bytes"]) == (est.allocated, est.reserved)
    assert main([*flags, "--trace", "--gpu", "h100-80gb"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert re.search(r"--zero none: reserved replayed", out), out


class Gelu(torch.nn.Module):
    """A Linear, then GPT-2's gelu_new in Python ops (its ``pow``)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> SimpleNamespace:
        y = self.linear(x)
        y = 0.5 * y * (1.0 + torch.tanh(0.79788456 * (y + 0.044715 * torch.pow(y, 3.0))))
        return SimpleNamespace(loss=y.float().sum())


def test_under_autocast_the_gpu_mode_runs_cudas_fp32_ops_in_fp32():
    """4 x 8 under bf16 autocast: CUDA casts pow's bf16 input to fp32 (a 128-byte copy) and writes fp32 (128 B),
    and what follows promotes to fp32; CPU autocast keeps pow in bf16 (64 B)."""

    def pow_outputs(gpu: bool) -> list[int]:
        trace = trace_training_step(
            Gelu, lambda: {"x": torch.ones(4, 8)}, "fused", run=StepRun(autocast="bf16", gpu=gpu)
        )
        return [s.nbytes for s in trace.storages if s.op == "pow" and s.phase == "forward"]

    assert pow_outputs(gpu=False) == [64]
    assert pow_outputs(gpu=True) == [128]


def test_the_cuda_fp32_policy_covers_torchs_own_cuda_autocast_lists():
    """The installed torch's CUDA autocast test lists (ops that must come out fp32) are all in ftprof's policy.
    Read as source (importing the module needs torch's test dependencies)."""
    import ast
    import importlib.util

    from ftprof.estimate.trace import CUDA_FP32_CASTS, CUDA_FP32_OUTPUT

    spec = importlib.util.find_spec("torch.testing._internal.autocast_test_lists")
    assert spec is not None
    assert spec.origin is not None
    tree = ast.parse(Path(spec.origin).read_text())
    cuda = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "AutocastTestLists")
    names = set()
    for node in ast.walk(cuda):
        target = node.targets[0] if isinstance(node, ast.Assign) else None
        wanted = isinstance(target, ast.Attribute) and target.attr in ("torch_fp32", "nn_fp32", "methods_fp32")
        if wanted and isinstance(node.value, ast.List):
            names |= {e.elts[0].value for e in node.value.elts if isinstance(e, ast.Tuple)}
    assert len(names) > 30, names
    assert names <= set(CUDA_FP32_CASTS) | set(CUDA_FP32_OUTPUT), names - set(CUDA_FP32_CASTS) - set(CUDA_FP32_OUTPUT)


def test_the_gpu_mode_trace_saves_what_the_h200_measured():
    """Saved activations measured on the H200 (SavedActivationMeter on real bf16 forwards with SDPA and dropout,
    profiles/h200-*: 13 points, bert-base and distilbert) against the GPU-mode trace of the same shapes on fake
    CPU tensors, unpadded as those batches were: within 0.05% on every point (the CPU's own kernels would save
    the dropout masks in bf16 and, with dropout, SDPA's probabilities: far more)."""
    from ftprof.estimate.trace import model_config
    from ftprof.records.results import latest, read_records, results_path

    traced: dict[tuple[str, int, int], int] = {}
    checked = 0
    for folder in ("h200-bert-base-uncased", "h200-distilbert-base-uncased"):
        for r in latest(read_records(results_path(ROOT / "profiles" / folder))):
            measured = r.profile.ranks[0].breakdown.get("saved_activations") if r.profile else None
            if r.status != "ok" or not measured:
                continue
            p, key = r.point, (r.model, r.point.batch_size, r.point.seq_len)
            if key not in traced:
                factory = known_model_factory(r.model, "classification", p.precision, "sdpa")
                batch = batch_factory(int(model_config(r.model).vocab_size), p.batch_size, p.seq_len)
                traced[key] = trace_training_step(factory, batch, "fused", run=StepRun(gpu=True)).saved_bytes
            assert abs(traced[key] - measured) / measured < 0.0005, (r.model, p.key, traced[key], measured)
            checked += 1
    assert checked == 13


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_gradient_checkpointing_traces_with_the_gpu_kernels_in_its_recompute(precision):
    """The checkpointed layers are recomputed in the backward: with the GPU's kernels there too (else the
    recompute saves a float dropout mask where the forward saved a bool one, and torch refuses the mismatch).
    Checkpointing saves each layer's input only: far less than without."""
    factory, batch = known_model_factory("tiny-bert", checkpointing=True), batch_factory(1024, 4, 64)
    run = StepRun(autocast=None if precision == "fp32" else precision, gpu=True)
    checkpointed = trace_training_step(factory, batch, "fused", run=run)
    full = trace_training_step(known_model_factory("tiny-bert"), batch, "fused", run=run)
    assert 0 < checkpointed.saved_bytes < full.saved_bytes / 2
    point = Point(precision=precision, zero=0, seq_len=64, batch_size=4, deepspeed=False, gradient_checkpointing=True)
    est = traced_estimate("tiny-bert", "classification", point, "adamw_torch_fused", SHIPPED_GPU, "h100-80gb")
    without = traced_estimate(
        "tiny-bert",
        "classification",
        replace(point, gradient_checkpointing=False),
        "adamw_torch_fused",
        SHIPPED_GPU,
        "h100-80gb",
    )
    assert est.items["saved_activations"] < without.items["saved_activations"]


def test_a_traced_only_request_names_no_factor_it_does_not_use(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    flags = ["--model", "tiny-bert", "--zero", "none", "--batch_size", "4", "--seq_len", "64", "--gpu", "h100-80gb"]
    assert main([*flags, "--precision", "bf16", "--trace"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--zero none: reserved replayed" in out
    assert "reserved/allocated factor" not in out
    assert "DeepSpeed stages: saved activations" not in out


def test_the_traced_grid_finds_the_largest_batch_that_fits(capsys):
    """--grid --trace on tiny-bert with a 3 GiB budget: the --zero none cell is the largest batch whose traced
    device-used peak fits (the next one does not), and the ZeRO-2 cell is the formulas' bisection with the
    traced activations, which are linear in the batch (the batch-1 and batch-2 traces give every batch's)."""
    from ftprof.estimate.architecture import arch_for
    from ftprof.estimate.estimator import estimate
    from ftprof.estimate.traced import traced_saved_activations

    flags = ["--model", "tiny-bert", "--zero", "none,2", "--precision", "bf16", "--grid", "--seq_lens", "64"]
    assert main([*flags, "--trace", "--budget", "3GiB", "--margin", "0", "--format", "json"]) == 0
    cells = {c["setting"]["deepspeed"]: c["max_batch_size"] for c in json.loads(capsys.readouterr().out)["cells"]}
    budget = 3 * 2**30
    plain = Point(precision="bf16", zero=0, seq_len=64, batch_size=1, deepspeed=False)

    def used(batch: int) -> int:
        return traced_estimate(
            "tiny-bert", "classification", plain.with_batch(batch), "adamw_torch_fused", SHIPPED_GPU, "gpu"
        ).device_used

    best = cells[False]
    assert best > 8
    assert used(best) <= budget < used(best + 1)
    ds = Point(precision="bf16", zero=2, seq_len=64, batch_size=cells[True])
    arch = arch_for("tiny-bert")

    def ds_used(point: Point) -> int:
        saved = traced_saved_activations("tiny-bert", "classification", point)
        return estimate(arch, point, SHIPPED_GPU, "gpu", saved_parts=saved).device_used

    assert ds_used(ds) <= budget < ds_used(ds.with_batch(ds.batch_size + 1))


def test_rotary_models_are_not_held_to_their_position_count():
    """tiny-llama (rotary, max_position_embeddings 512) traces at 1,024 tokens, as its real forward runs."""
    from ftprof.estimate.traced import check_positions

    check_positions("tiny-llama", 1024)
    point = Point(precision="bf16", zero=2, seq_len=1024, batch_size=1)
    assert traced_saved_activations_of("tiny-llama", point) > 0


def traced_saved_activations_of(model: str, point: Point) -> int:
    from ftprof.estimate.traced import traced_saved_activations

    return traced_saved_activations(model, "causal-lm", point)["traced forward"]
