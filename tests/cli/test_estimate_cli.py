"""``ftprof estimate``'s GPU figures: card sizes in one unit, a fits verdict with a stated margin, and the
constants it assumes named as such."""

import json
import math
import re
from dataclasses import replace

import pytest

from ftprof.cli.estimate import main
from ftprof.estimate.architecture import arch_for
from ftprof.estimate.calibration import SHIPPED_GPU, calibration_path, fit_reserved_factor, reserved_ratios
from ftprof.estimate.estimator import GPUS, Calibration, estimate, gpu_key, max_batch
from ftprof.point import Point
from ftprof.records.profile import Profile, RankProfile
from ftprof.records.results import Record, read_records
from ftprof.report.estimate_tables import verdict
from tests.conftest import ROOT

MIB = 2**20
# bert-base at batch 32 x 512, bf16, ZeRO-2 over 8 ranks: the README's example (about 6 GiB per rank)
POINT_FLAGS = ["--model", "bert-base-uncased", "--batch_size", "32", "--seq_len", "512", "--zero", "2"]
POINT_FLAGS += ["--world_size", "8"]


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No saved calibration but the test's own, and a console wide enough that no table cell wraps."""
    monkeypatch.setenv("FTPROF_HOME", str(tmp_path / "ftprof"))
    monkeypatch.setenv("COLUMNS", "300")


def test_gpu_sizes_are_nvml_totals_in_one_unit():
    """Every size is what NVML reports: a whole number of MiB (141 * 10**9, the old H200 figure, is not), and
    the cards order as their memory does (the H200's old decimal figure sat under its NVML total)."""
    assert {k: v % MIB for k, v in GPUS.items()} == dict.fromkeys(GPUS, 0)
    assert GPUS["h200-141gb"] > GPUS["h100-94gb"] > GPUS["h100-80gb"]
    assert GPUS["a100-80gb"] > GPUS["h100-80gb"]  # 81920 MiB against 81559 MiB
    assert GPUS["l40s-48gb"] > GPUS["a100-40gb"] > GPUS["v100-32gb"] > GPUS["l4-24gb"] > GPUS["a10g-24gb"]
    assert GPUS["h100-80gb"] == 81559 * MIB  # nvidia-smi's memory.total on an H100 80GB HBM3
    # a device named without its size is told apart by the total NVML reports for it
    assert gpu_key("NVIDIA H100 NVL", memory_bytes=95830 * MIB) == "h100-94gb"
    assert gpu_key("NVIDIA H100 PCIe", memory_bytes=81559 * MIB) == "h100-80gb"


def predicted_used() -> int:
    """The device-used bytes the CLI predicts for POINT_FLAGS on an uncalibrated GPU (the shipped constants)."""
    point = Point(batch_size=32, seq_len=512, precision="bf16", zero=2, world_size=8)
    return estimate(arch_for("bert-base-uncased"), point, SHIPPED_GPU, "gpu").device_used


def test_the_margin_decides_a_case_that_fits_only_without_it(capsys):
    """A budget 3% above the prediction fits with no margin and not with the default 5% kept free."""
    used = predicted_used()
    budget = str(int(used / 0.97))
    assert main([*POINT_FLAGS, "--budget", budget, "--margin", "0"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"fits \(predicted [\d.]+ GiB of [\d.]+ GiB, 0% margin kept\)", out), out
    assert "does NOT fit" not in out
    for margin in ([], ["--margin", "0.05"]):
        assert main([*POINT_FLAGS, "--budget", budget, *margin]) == 0
        out = capsys.readouterr().out
        assert "does NOT fit (predicted" in out, out
        assert "with 5% kept free" in out, out
    # the boundary: 95 of 100 fits with 5% kept free, 96 does not
    assert verdict(95 * MIB, 100 * MIB, 0.05)[0]
    assert not verdict(96 * MIB, 100 * MIB, 0.05)[0]


def grid_cell(out: str, seq: int) -> int:
    row = next(line for line in out.splitlines() if re.match(rf"\W*{seq}\W", line))
    return int(re.findall(r"\d+", row)[1])


def test_grid_solves_for_the_budget_less_the_margin(capsys):
    """--grid's largest batch is the estimator's for budget x (1 - margin), and a margin makes it smaller."""
    arch, point = arch_for("bert-base-uncased"), Point(batch_size=1, seq_len=512, precision="bf16", zero=0)
    cells = []
    for margin in (0.0, 0.25):
        flags = ["--model", "bert-base-uncased", "--grid", "--seq_lens", "512", "--zero", "0", "--budget", "24GiB"]
        assert main([*flags, "--margin", str(margin)]) == 0
        out = capsys.readouterr().out
        title = f"fits 24.0 GiB with a {margin:.0%} margin kept free ({24 * (1 - margin):.1f} GiB)"
        assert title in " ".join(out.split())  # the title wraps to the table's width
        cells.append(grid_cell(out, 512))
        assert cells[-1] == max_batch(arch, point, int(24 * 2**30 * (1 - margin)), SHIPPED_GPU, "gpu")
    assert cells[1] < cells[0]


@pytest.mark.parametrize("margin", ["1.5", "1", "-0.1"])
def test_a_margin_outside_0_to_1_is_a_one_line_error(capsys, margin):
    assert main([*POINT_FLAGS, "--gpu", "h100-80gb", "--margin", margin]) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if "error" in line]
    assert errors == [f"ftprof: error: --margin {margin}: must be >= 0 and < 1 (the fraction of the budget kept free)"]
    assert "Traceback" not in captured.err
    assert captured.out == ""


def test_an_uncalibrated_gpu_estimate_says_its_constants_come_from_the_shipped_h200_sweep(capsys):
    assert main([*POINT_FLAGS, "--gpu", "h100-80gb"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # table cells wrap
    assert "runtime 0.74 GiB — fitted on 11 points of an H200 sweep shipped with ftprof" in out
    assert "DeepSpeed runtime (NCCL) 0.86 GiB — from an H200 sweep shipped with ftprof" in out
    assert "allocator reserved/allocated factor 1.13 — fitted on 11 points of an H200 sweep" in out
    assert "of 79.6 GiB, 5% margin kept" in out  # 81559 MiB, in GiB

    fitted = Calibration(device="h100-80gb", runtime_bytes=0.8 * 2**30, reserved_factor=1.03, fitted_on=12)
    replace(fitted, reserved_fitted_on=9).save(calibration_path("NVIDIA H100 80GB HBM3"))
    assert main([*POINT_FLAGS, "--gpu", "h100-80gb"]) == 0
    out = capsys.readouterr().out
    assert "runtime 0.80 GiB — fitted on 12 points" in out
    assert "allocator reserved/allocated factor 1.03 — fitted on 9 points" in out
    assert "assumed" not in out


def test_calibrations_fitted_to_the_older_estimator_are_set_aside(tmp_path, monkeypatch, caplog):
    """Version-1 files were fitted with an activation factor that also scaled the live logits and the
    recomputed layer and could fall below 1: their constants mean something else now."""
    from ftprof.estimate.calibration import calibration_path, load_calibration

    monkeypatch.setenv("FTPROF_HOME", str(tmp_path))
    path = calibration_path("h100-80gb")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"device": "h100-80gb", "runtime_bytes": 1e9, "activation_factor": 0.6, "fitted_on": 5}))
    assert Calibration.load(path) is None
    cal = load_calibration("NVIDIA H100 80GB HBM3")
    assert cal == SHIPPED_GPU  # the constants shipped for GPUs, not the stale file's
    assert "older estimator" in caplog.text
    Calibration(device="h100-80gb", activation_factor=1.3, fitted_on=5).save(path)
    assert load_calibration("NVIDIA H100 80GB HBM3").activation_factor == 1.3


def gpu_rank(rank: int, phases: dict[str, tuple[int, int]]) -> RankProfile:
    """A rank of a CUDA run: per phase, torch's (max_memory_allocated, max_memory_reserved) and NVML."""
    return RankProfile(
        rank=rank,
        figure="process",
        phases={
            name: {
                "torch_allocated_bytes": allocated,
                "torch_reserved_bytes": reserved,
                "nvml_process_bytes": reserved + 600 * MIB,
            }
            for name, (allocated, reserved) in phases.items()
        },
    )


def record(ranks: list[RankProfile], sampler: str = "nvml", batch: int = 8) -> Record:
    point = Point(batch_size=batch, seq_len=128, precision="bf16", zero=2, world_size=len(ranks))
    profile = Profile(sampler=sampler, world_size=len(ranks), ranks=ranks)
    return Record(point=point, status="ok", model="tiny-bert", peak_bytes=2**30, profile=profile)


def test_fit_reserved_factor_is_the_median_ratio_of_the_ranks_peaks():
    """Each rank's ratio is of its peaks over phases (here the optimizer phase's reserved over the steady
    phase's allocated); ranks and records without torch's figures (CPU runs) are left out."""
    records = [
        record(
            [
                gpu_rank(0, {"steady": (4_000 * MIB, 4_300 * MIB), "optimizer": (3_900 * MIB, 4_400 * MIB)}),  # 1.1
                gpu_rank(1, {"steady": (4_000 * MIB, 4_200 * MIB)}),  # 1.05
            ]
        ),
        record([gpu_rank(0, {"steady": (10_000 * MIB, 13_000 * MIB)})], batch=16),  # 1.3
        record([RankProfile(rank=0, figure="rss", phases={"steady": {"rss_bytes": 2**30}})], sampler="rss"),
        Record(point=Point(batch_size=64, seq_len=128, precision="bf16", zero=2), status="oom", model="tiny-bert"),
    ]
    assert reserved_ratios(records) == pytest.approx([1.1, 1.05, 1.3])
    assert fit_reserved_factor(records) == pytest.approx(1.1)
    assert fit_reserved_factor(records[1:]) == pytest.approx(1.3)


def test_fit_reserved_factor_is_none_for_a_cpu_sweep():
    cpu = read_records(ROOT / "profiles" / "cpu-2core-tiny-bert" / "results.jsonl")
    assert cpu
    assert fit_reserved_factor(cpu) is None


def test_calibrating_on_a_gpu_sweep_fits_and_records_the_allocator_factor(tmp_path, capsys):
    """A GPU sweep's records (the CPU profile's points, as an H100 would report them, with torch's allocator
    figures) calibrate the allocator factor to their median ratio and say on how many points."""
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    lines = []
    for i, r in enumerate(read_records(ROOT / "profiles" / "cpu-2core-tiny-bert" / "results.jsonl")):
        ratio = 1.02 + 0.01 * i  # 1.02 ... 1.13 over 12 points: median 1.075
        allocated = r.peak_bytes // 2
        gpu = replace(
            r, machine={**r.machine, "device": "NVIDIA H100 80GB HBM3"}, profile=replace(r.profile, sampler="nvml")
        )
        gpu.profile.ranks = [gpu_rank(0, {"steady": (allocated, int(allocated * ratio))})]
        lines.append(json.dumps(gpu.to_json()))
    (sweep / "results.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["--calibrate", str(sweep)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    cal = Calibration.load(calibration_path("h100-80gb"))
    assert cal.reserved_factor == pytest.approx(1.075, abs=1e-6)
    assert cal.reserved_fitted_on == 12
    assert "allocator reserved/allocated factor 1.075 (fitted on 12 points)" in out

    assert main(["--calibrate", str(ROOT / "profiles" / "cpu-2core-tiny-bert")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "(assumed: no torch allocator figures in this sweep)" in out
    assert Calibration.load(calibration_path("cpu")).reserved_fitted_on == 0


def device_used_row(out: str) -> list[float]:
    row = next(line for line in out.splitlines() if "device used (NVML / RSS)" in line)
    return [float(x) for x in re.findall(r"\d+\.\d{3}", row)]


def test_a_list_of_stages_is_one_table_with_a_column_per_stage(capsys):
    """--zero 0,2,3 in a single estimate: the columns are the estimator's figures for each stage, exactly."""
    flags = ["--model", "bert-base-uncased", "--batch_size", "8", "--seq_len", "512", "--gpu", "h100-80gb"]
    assert main([*flags, "--zero", "0,2,3"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "ZeRO-0" in line)
    assert header.index("ZeRO-0") < header.index("ZeRO-2") < header.index("ZeRO-3")
    arch, cal = arch_for("bert-base-uncased"), SHIPPED_GPU
    expected = [
        round(estimate(arch, Point(batch_size=8, seq_len=512, precision="bf16", zero=z), cal).device_used / 2**30, 3)
        for z in (0, 2, 3)
    ]
    assert device_used_row(out) == expected
    assert out.count("fits") >= 3
    assert "does NOT fit" not in out
    # one stage in the list: the itemised table of old, with its verdict line
    assert main([*flags, "--zero", "2"]) == 0
    out = capsys.readouterr().out
    assert device_used_row(out) == expected[1:2]
    assert f"fits (predicted {expected[1]:.1f} GiB of 79.6 GiB, 5% margin kept)" in out


def test_the_old_spellings_still_work_with_a_note(capsys):
    """--zeros and --offload_optimizer/--offload_param map onto --zero and --offload, each with one note."""
    flags = ["--model", "bert-base-uncased", "--grid", "--seq_lens", "512", "--budget", "24GiB"]
    assert main([*flags, "--zero", "0,3", "--offload", "optimizer+param"]) == 0
    new = capsys.readouterr()
    assert main([*flags, "--zeros", "0,3", "--offload_param"]) == 0
    old = capsys.readouterr()
    assert old.out == new.out
    assert "ZeRO-3 offload optimizer+param" in old.out
    notes = [line for line in old.err.splitlines() if line.startswith("ftprof: note:")]
    assert notes == [
        "ftprof: note: --zeros is deprecated; --zero takes the list: --zero 0,3",
        "ftprof: note: --offload_param is deprecated; use --offload optimizer+param",
    ]
    assert main([*flags, "--zero_stages", "0", "--zero", "2"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "ftprof: error: --zero_stages '0' and --zero both name the stages; pass --zero only"
    )


def test_json_output_has_every_item_and_the_three_peaks_of_each_setting(capsys):
    flags = ["--model", "bert-base-uncased", "--batch_size", "8", "--seq_len", "512", "--gpu", "h100-80gb"]
    assert main([*flags, "--zero", "0,3", "--offload", "none", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["schema"] == "ftprof.estimate/1"
    assert data["target"]["budget_bytes"] == GPUS["h100-80gb"]
    arch = arch_for("bert-base-uncased")
    assert data["params"] == arch.params
    assert [s["point"]["zero"] for s in data["settings"]] == [0, 3]
    for setting in data["settings"]:
        est = estimate(arch, Point.from_json(setting["point"]), SHIPPED_GPU, "gpu")
        assert setting["items"] == est.items
        assert sum(setting["items"].values()) == setting["allocated_bytes"] == est.allocated
        assert (setting["reserved_bytes"], setting["device_used_bytes"]) == (est.reserved, est.device_used)
        assert setting["fits"] is True
        assert setting["headroom_bytes"] == data["target"]["usable_bytes"] - est.device_used
    assert {c["name"] for c in data["constants"]} >= {"runtime", "allocator reserved/allocated factor"}


def test_json_grid_gives_the_largest_batch_per_length_and_setting(capsys):
    flags = ["--model", "bert-base-uncased", "--grid", "--seq_lens", "128,512", "--zero", "0,2", "--budget", "24GiB"]
    assert main([*flags, "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["schema"] == "ftprof.estimate-grid/1"
    arch = arch_for("bert-base-uncased")
    assert len(data["cells"]) == 4
    for cell in data["cells"]:
        point = Point.from_json(cell["setting"])
        assert (point.seq_len, point.batch_size) == (cell["seq_len"], cell["max_batch_size"])
        assert cell["max_batch_size"] == max_batch(arch, point, int(24 * 2**30 * 0.95), SHIPPED_GPU, "gpu")


def test_zero_none_estimates_plain_trainer_with_the_optimizer_it_steps(capsys):
    """--zero none --optim: no master copy, the optimizer's states and step temporaries, no NCCL runtime."""
    from ftprof.estimate.optimizers import trainer_optimizer

    flags = ["--model", "gpt2", "--task", "causal-lm", "--batch_size", "2", "--seq_len", "16", "--precision", "fp32"]
    arch = arch_for("gpt2", task="causal-lm")
    point = Point(precision="fp32", zero=0, seq_len=16, batch_size=2)
    used = {}
    for optim in ("adamw_torch", "adamw_torch_fused", "sgd"):
        assert main([*flags, "--zero", "none", "--optim", optim, "--gpu", "a10g-24gb", "--format", "json"]) == 0
        (setting,) = json.loads(capsys.readouterr().out)["settings"]
        plain = replace(point, deepspeed=False)
        est = estimate(arch, plain, SHIPPED_GPU, "gpu", trainer_optim=trainer_optimizer(optim))
        assert setting["key"] == plain.key == "fp32-znone-w1-ga1-s16-b2"
        assert setting["device_used_bytes"] == est.device_used
        assert setting["items"]["master_weights"] == 0
        used[optim] = setting
    p = arch.params
    assert used["adamw_torch"]["items"]["optimizer_states"] == 8 * p
    assert used["sgd"]["items"]["optimizer_states"] == 0
    # foreach AdamW's step holds one fp32 copy of the larger of the Trainer's two parameter groups (the decayed
    # weights; torch._foreach_sqrt of their second moments), beyond what the forward held
    decayed = sum(math.prod(shape) for shape in arch.trainer_step_groups[0])
    assert decayed > 0.99 * p
    foreach, fused = used["adamw_torch"]["allocated_bytes"], used["adamw_torch_fused"]["allocated_bytes"]
    assert foreach - fused == 4 * decayed - sum(
        used["adamw_torch_fused"]["items"].get(k, 0) for k in ("saved_activations", "temporaries")
    )
    # DeepSpeed's ZeRO-0 of the same point carries its NCCL runtime on top of the allocator's figure
    ds, plain = estimate(arch, point, SHIPPED_GPU, "gpu"), used["adamw_torch_fused"]
    ds_outside = ds.device_used - ds.reserved
    plain_outside = plain["device_used_bytes"] - plain["reserved_bytes"]
    assert ds_outside - plain_outside == pytest.approx(SHIPPED_GPU.deepspeed_runtime_bytes, abs=1)


def test_zero_none_beside_zero_stages_is_one_column_each(capsys):
    """--zero none,0,2: plain Trainer beside DeepSpeed's stages, each column the estimate of its own point."""
    from ftprof.estimate.optimizers import trainer_optimizer

    flags = ["--model", "gpt2", "--batch_size", "2", "--seq_len", "64", "--precision", "fp32", "--gpu", "a10g-24gb"]
    assert main([*flags, "--zero", "2,none,0", "--optim", "adamw_torch", "--format", "json"]) == 0
    settings = json.loads(capsys.readouterr().out)["settings"]
    assert [s["key"] for s in settings] == [
        "fp32-znone-w1-ga1-s64-b2",
        "fp32-z0-w1-ga1-s64-b2",
        "fp32-z2-w1-ga1-s64-b2",
    ]
    arch = arch_for("gpt2")
    for setting in settings:
        point = Point.from_json(setting["point"])
        optim = None if point.deepspeed else trainer_optimizer("adamw_torch")
        assert (
            setting["device_used_bytes"] == estimate(arch, point, SHIPPED_GPU, "gpu", trainer_optim=optim).device_used
        )
    plain, zero0 = settings[0]["items"], settings[1]["items"]
    assert plain["optimizer_step"] > zero0.get("optimizer_step", 0)  # foreach AdamW's fp32 copy of the parameters
    assert main([*flags, "--zero", "none,0", "--optim", "adamw_torch"]) == 0
    out = capsys.readouterr().out
    assert "no DeepSpeed, --optim adamw_torch" in out
    assert "ZeRO-0" in out


@pytest.mark.parametrize(
    ("optim", "label"),
    [("adafactor", "Adafactor's second-moment statistics"), ("sgd", "SGD: none"), ("adamw_torch", "Adam moments")],
)
def test_the_optimizer_states_row_names_the_state_of_the_optimizer_that_steps(capsys, optim, label):
    flags = ["--model", "gpt2", "--batch_size", "2", "--seq_len", "16", "--precision", "fp32", "--optim", optim]
    assert main([*flags, "--zero", "none"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"optimizer states ({label})" in out
    assert ("Adam moments" in out) == (optim == "adamw_torch")
    assert main([*flags, "--zero", "none,2"]) == 0  # DeepSpeed's column steps its config's Adam
    out = " ".join(capsys.readouterr().out.split())
    expected = "(Adam moments)" if optim == "adamw_torch" else f"({label}) / optimizer states (Adam moments)"
    assert f"optimizer states {expected}" in out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--zero", "none", "--precision", "bf16"], "autocast"),
        (
            ["--zero", "none", "--optim", "adamw_torch_4bit", "--precision", "fp32"],
            "not modelled by ftprof estimate yet",
        ),
    ],
)
def test_zero_none_refuses_what_it_does_not_model(capsys, extra, message):
    assert main(["--model", "gpt2", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err


def test_calibration_fits_full_fine_tuning_and_leaves_lora_points_out(tmp_path, capsys):
    """LoRA points are judged, never fitted: 2 full points beside 10 LoRA ones are too few to calibrate on,
    and the message says why; the calibration file is not touched."""
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    lines = []
    for i, r in enumerate(read_records(ROOT / "profiles" / "cpu-2core-tiny-bert" / "results.jsonl")):
        if i >= 2:
            r = replace(r, point=replace(r.point, peft="lora", lora_r=8))
        lines.append(json.dumps(r.to_json()))
    (sweep / "results.jsonl").write_text("\n".join(lines) + "\n")
    before = calibration_path("cpu").read_bytes() if calibration_path("cpu").exists() else None
    assert main(["--calibrate", str(sweep)]) == 2
    err = capsys.readouterr().err
    assert (
        "2 measured points of full fine-tuning under DeepSpeed (10 LoRA or --zero none points are not fitted on)" in err
    )
    assert (calibration_path("cpu").read_bytes() if calibration_path("cpu").exists() else None) == before
