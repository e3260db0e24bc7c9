"""The Trainer optimizers' memory models (``ftprof.estimate.optimizers``) against real CPU steps: the state each
keeps and the temporaries of a steady step, traced (``trace.measure_optimizer_step``) on the optimizer HF Trainer
itself builds for ``--optim NAME``, over its two parameter groups."""

import os
import subprocess
import sys
import tempfile

import pytest
import torch
from transformers import Trainer, TrainingArguments
from transformers.optimization import Adafactor

from ftprof.estimate.architecture import DECAY_EXCLUDED, arch_for
from ftprof.estimate.optimizers import TRAINER_OPTIMIZERS
from ftprof.estimate.trace import known_model_factory, measure_optimizer_step
from tests.conftest import ROOT, skip_or_fail

# bitsandbytes and torchao live apart (launch/setup.sh: .venv/apart), out of this process's path: peft imports
# bitsandbytes with every Trainer when it can. Their cases (bitsandbytes_cases.py, torchao_cases.py) run in a
# pytest of their own that adds the folder to its path (the last test here).
APART = ROOT / ".venv" / "apart"
CASES = ["tests/estimate/bitsandbytes_cases.py", "tests/estimate/torchao_cases.py"]
#: Optimizers whose models are checked in those cases, not here.
APART_OPTIMIZERS = {"adamw_bnb_8bit", "adamw_torch_8bit"}
#: Optimizers that step through torch.compile, which runs under no dispatch mode: their step is the allocator's.
COMPILED = {"adamw_torch_8bit"}


# 0-dim tensors each keeps per parameter, which the models leave out: Adam's ``step``, Adafactor's ``RMS``.
# bitsandbytes keeps ``step`` as a Python int; torchao as a 0-dim tensor.
SCALARS = {
    "adamw_torch": 1,
    "adamw_torch_fused": 1,
    "sgd": 0,
    "adafactor": 1,
    "adamw_bnb_8bit": 0,
    "adamw_torch_8bit": 1,
}


def forget_bitsandbytes_overrides() -> None:
    """bitsandbytes keeps every optimizer's 32-bit overrides in one process-wide manager, keyed by (group, index)
    as well as by parameter: an earlier model's embedding position would make a later model's parameter at the
    same position 32-bit. A training run builds one optimizer; a test process builds many, so start clean."""
    import bitsandbytes as bnb

    bnb.optim.GlobalOptimManager.get_instance().initialize()


def trainers_optimizer(model: torch.nn.Module, optim: str, **override) -> torch.optim.Optimizer:
    """The optimizer Trainer.create_optimizer builds for ``--optim optim`` (its class and arguments, its two
    groups, bitsandbytes' 32-bit embeddings); with ``override``, the same class and groups built with them."""
    if "bnb" in optim:
        forget_bitsandbytes_overrides()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, optim=optim, report_to="none", use_cpu=True)
        if not override:
            return Trainer(model=model, args=args).create_optimizer()
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    decay = set(Trainer.get_decay_parameter_names(None, model))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if n in decay], "weight_decay": args.weight_decay},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]
    return cls(groups, **{**kwargs, **override})


MODELS = ["tiny-bert", "tiny-gpt2", "tiny-llama"]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("optim", sorted(set(TRAINER_OPTIMIZERS) - APART_OPTIMIZERS))  # the *_cases.py
def test_each_optimizers_state_and_step_match_a_real_step_on_the_trainers_groups(model, optim):
    check_against_a_real_step(model, optim)


def check_against_a_real_step(model: str, optim: str) -> None:
    task = "causal-lm" if model == "tiny-llama" else "classification"
    built = known_model_factory(model, task)()
    arch = arch_for(model, task=task)
    groups = arch.trainer_step_groups
    built_groups = trainers_optimizer(built, optim).param_groups
    assert [[tuple(p.shape) for p in g["params"]] for g in built_groups] == [list(g) for g in groups]
    params = [p for g in built_groups for p in g["params"]]
    model_of = TRAINER_OPTIMIZERS[optim]
    cost = measure_optimizer_step(params, trainers_optimizer(built, optim), dispatch=optim not in COMPILED)
    assert cost.state_bytes == model_of.states(groups) + 4 * SCALARS[optim] * len(params)
    step = model_of.temporaries(groups, "cpu")
    # What the CPU allocator saw: kernels' own tensors too, and a few 0-dim scalars (up to 84 bytes here).
    assert step <= cost.allocator_peak <= step + 128
    if optim not in APART_OPTIMIZERS:  # bitsandbytes' CPU kernel allocates below the dispatcher; torchao compiles
        assert cost.transient_peak == step
    if optim == "adamw_torch":  # the GPU default is foreach: the same optimizer with foreach=True, per group
        foreach = measure_optimizer_step(params, trainers_optimizer(built, optim, foreach=True))
        largest_group = max(sum(p.numel() for p in g["params"]) for g in built_groups)
        assert foreach.transient_peak == model_of.temporaries(groups, "gpu") == 4 * largest_group


def test_a_loops_peak_holds_the_previous_parameters_temporary():
    """Where the largest parameter is not the first, a per-parameter loop's peak adds the previous one's
    last temporary (still bound to its variable): hand-chosen shapes, real steps."""
    shapes = [(8,), (64, 32), (300, 100), (50,), (40, 200)]
    torch.manual_seed(0)
    for optim, make in (
        ("adamw_torch", lambda ps: torch.optim.AdamW(ps, foreach=False)),
        ("adafactor", lambda ps: Adafactor(ps, lr=1e-3, scale_parameter=False, relative_step=False)),
    ):
        params = [torch.nn.Parameter(torch.randn(*s)) for s in shapes]
        cost = measure_optimizer_step(params, make(params))
        expected = TRAINER_OPTIMIZERS[optim].temporaries([shapes], "cpu")
        assert cost.transient_peak == expected == 4 * (2 * 30000 + 64 * 32)  # the 300x100 matrix after the 64x32


@pytest.mark.parametrize("model", ["tiny-bert", "tiny-llama"])
def test_the_decay_rule_is_the_trainers(model):
    from transformers.trainer_pt_utils import get_parameter_names

    built = known_model_factory(model, "causal-lm" if model == "tiny-llama" else "classification")()
    ours = get_parameter_names(built, [torch.nn.LayerNorm], DECAY_EXCLUDED)
    assert ours == Trainer.get_decay_parameter_names(None, built)
    assert len(ours) < len(list(built.named_parameters()))  # some parameters do not decay


def test_the_8bit_optimizer_cases_pass_in_a_pytest_with_bitsandbytes_and_torchao():
    """bitsandbytes_cases.py and torchao_cases.py in a pytest of their own, with ``.venv/apart`` on its path:
    all 6 cases pass."""
    import importlib.util

    for package in ("bitsandbytes", "torchao"):
        if importlib.util.find_spec(package) is None and not (APART / package).is_dir():
            skip_or_fail(f"{package} is neither importable nor installed apart in {APART} (launch/setup.sh does)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(APART), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "pytest", *CASES, "-q", "-p", "no:cacheprovider"]
    proc = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    failures = [line for line in proc.stdout.splitlines() if line.startswith(("E ", "FAILED", "ERROR"))]
    assert proc.returncode == 0, "\n".join(failures[:40]) or proc.stdout[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary.startswith("6 passed"), summary
    assert "skipped" not in summary, summary
