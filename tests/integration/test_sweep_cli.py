"""`ftprof sweep` for real: fresh processes per point, ZeRO 0/2/3, 2 ranks, forced OOM, SIGKILL + resume."""

import json
import sys

import pytest

from ftprof.cli.main import main as ftprof_main
from ftprof.records.results import Record, latest, read_records
from tests.conftest import ROOT, run_group
from tests.integration.conftest import shm_buffers, train_env

SWEEP = [sys.executable, "-m", "ftprof.cli.main", "sweep", "--steps", "2", "--warmup", "1", "--min_seconds", "0"]
DEEPSPEED_ACCELERATOR_LOG = "Setting accelerator to"  # deepspeed/accelerator/real_accelerator.py


def sweep(args, timeout=900):
    """Run `ftprof sweep` (tiny-bert unless --model is given) to the end; fail with its output otherwise."""
    if "--model" not in args:
        args = ["--model", "tiny-bert", *args]
    before = shm_buffers()
    proc = run_group(SWEEP + args, timeout, env=train_env(), cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert shm_buffers() <= before, "the sweep's points left DeepSpeed shm buffers in /dev/shm"
    # DeepSpeed logs its accelerator detection when imported without CUDA ("Setting accelerator to CPU"): the
    # driver does not import it, and the points' output goes to their logs, not between ftprof's lines.
    assert DEEPSPEED_ACCELERATOR_LOG not in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[:2000]
    return proc


def check_two_rank_counts(two: Record, seq_len: int) -> None:
    """A two-rank point of batch 4: both ranks profiled, and one step counts 4 x 1 x 2 samples of ``seq_len``."""
    assert [r.rank for r in two.profile.ranks] == [0, 1]
    assert two.point.world_size == 2
    assert two.profile.samples_per_step == 4 * 1 * 2  # batch x accumulation x ranks, exactly
    padded_per_step = two.profile.padded_tokens_per_s * two.profile.window_s / two.profile.steady_steps
    assert two.samples_per_s > 0
    assert padded_per_step == pytest.approx(8 * seq_len)


@pytest.mark.slow
def test_sweep_grid_ranks_resume_and_report(tmp_path, capsys):
    """A grid, resumed with a new point, resumed again with a two-rank ZeRO-3 point, then reported in every
    format. A two-rank ZeRO-2 point's counts (check_two_rank_counts) are checked on the one that
    test_memory_snapshot_writes_what_the_cpu_allows_and_the_records_name_it sweeps anyway: a two-rank point
    costs 20-60 s on 2 cores, and a second one here would check nothing that one does not."""
    out = tmp_path / "profile"
    sweep(["--zero", "0,2,3", "--batch_sizes", "4,32", "--seq_lens", "512", "--out", str(out), "--no_report"])
    sweep(["--zero", "2", "--batch_sizes", "4", "--seq_lens", "32", "--out", str(out), "--resume", "--no_report"])
    # Two-rank points are the dear ones: this run measures nothing twice (the first run's re-measures remain).
    last = sweep(
        ["--zero", "3", "--batch_sizes", "4", "--seq_lens", "512", "--world_size", "2", "--out", str(out), "--resume"]
        + ["--no_remeasure"]
    )
    records = latest(read_records(out / "results.jsonl"))
    by_key = {r.point.key: r for r in records}
    assert len(records) == len(by_key) == 8
    assert {r.status for r in records} == {"ok"}
    peak = {k: r.peak_bytes for k, r in by_key.items()}
    for z in (0, 2, 3):  # peaks grow with the batch...
        assert peak[f"fp32-z{z}-w1-ga1-s512-b32"] > peak[f"fp32-z{z}-w1-ga1-s512-b4"] * 1.1
    assert peak["fp32-z2-w1-ga1-s512-b4"] > peak["fp32-z2-w1-ga1-s32-b4"]  # ...and with the sequence
    check_two_rank_counts(by_key["fp32-z3-w2-ga1-s512-b4"], 512)
    first_line = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    assert {"torch", "transformers", "deepspeed", "device"} <= set(first_line["machine"])
    # The sweep ends with its report; every export format renders from the same file.
    assert "Recommendations" in last.stdout
    assert "Pareto" in last.stdout
    # In this process (`ftprof report` as a command is what each sweep above ran to write its own report).
    capsys.readouterr()
    for fmt, check in (("md", "| precision |"), ("csv", "precision,zero,world_size"), ("json", '"recommendations"')):
        assert ftprof_main(["report", str(out), "--format", fmt, "--write_config"]) == 0
        printed = capsys.readouterr().out
        assert check in printed
    # The machine's drift: the first clean point measured again, once over the three runs, shown with the pick.
    lines = read_records(out / "results.jsonl")
    clean = [r for r in lines if r.status == "ok" and r.run.remeasured is None and not r.profile.contended]
    again = [r for r in lines if r.run.remeasured == "repeat"]
    assert len(again) == 1, [r.point.key for r in again]
    assert again[0].point.key == clean[0].point.key, [r.point.key for r in again]
    # The pick carries the worst of the sweep's re-measures (the repeat or a close call) against a first figure.
    rep = json.loads(printed)["recommendations"][0]["repeat"]  # the json export, the loop's last
    firsts = {r.point.key: r.samples_per_s for r in reversed(clean)}
    agains = [
        (r.point.key, r.samples_per_s)
        for r in lines
        if r.run.remeasured in ("repeat", "close call") and r.status == "ok" and not r.profile.contended
    ]
    assert (rep["key"], pytest.approx(rep["again"])) in agains
    assert rep["first"] == pytest.approx(firsts[rep["key"]])
    drift = max(rep["first"], rep["again"]) / min(rep["first"], rep["again"]) - 1
    assert all(max(firsts[k], x) / min(firsts[k], x) - 1 <= drift + 1e-9 for k, x in agains if k in firsts)
    for png in ("memory.png", "throughput.png", "breakdown.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "recommended_fastest.json").read_text())["zero_optimization"]["stage"] in (0, 2, 3)


@pytest.mark.slow
def test_forced_oom_is_a_result_and_larger_points_are_skipped(tmp_path):
    out = tmp_path / "oom"
    # A 4 GiB address-space limit per point: batch 4 fits, batch 128 x 512 tokens can't allocate its attention.
    sweep(
        [
            "--zero",
            "0",
            "--batch_sizes",
            "4,128,256",
            "--seq_lens",
            "512",
            "--child_memory_limit",
            "4GiB",
            "--out",
            str(out),
            "--no_report",
        ]
    )
    status = {r.point.batch_size: r for r in read_records(out / "results.jsonl")}
    assert [status[b].status for b in (4, 128, 256)] == ["ok", "oom", "skipped"]
    assert "can't allocate memory" in status[128].reason
    assert status[128].stderr_tail
    assert "fp32-z0-w1-ga1-s512-b128 did" in status[256].reason


@pytest.mark.slow
def test_sigkilled_sweep_resumes_without_loss_or_duplicates(killed_local_sweep):
    """The sweep (tests/integration/conftest.py::killed_local_sweep, shared with test_sweep_slurm) was SIGKILLed
    with its running point after the first record, then resumed with --resume."""
    finished = killed_local_sweep.finished
    assert 1 <= len(finished) < 4
    lines = (killed_local_sweep.out / "results.jsonl").read_text().splitlines()
    keys = [json.loads(x)["key"] for x in lines]
    assert len(keys) == len(set(keys)) == 4
    assert lines[: len(finished)] == finished  # what finished before the kill is kept as it was


@pytest.mark.slow
def test_dataset_lengths_are_measured_worst_batch_included(tmp_path):
    from ftprof.train.data import load_raw, prepare_task
    from ftprof.train.models import resolve_model_spec, train_tokenizer_for

    out = tmp_path / "data"
    sweep(
        [
            "--dataset",
            "synthetic",
            "--zero",
            "0",
            "--batch_sizes",
            "8",
            "--seq_lens",
            "64",
            "--out",
            str(out),
            "--no_report",
            "--no_remeasure",  # one point, one record
        ]
    )
    (record,) = read_records(out / "results.jsonl")
    m = record.profile
    assert record.status == "ok"
    # Real texts are shorter than 64 tokens and of varied length: padding shows, and tokens/sample < 64.
    assert m.real_tokens_per_s < m.padded_tokens_per_s <= 64 * m.samples_per_s
    # The longest input of the data (tokenized as the point does) was trained on, although the window only
    # averages over random batches: the worst-case batch always runs first.
    task = prepare_task(load_raw("synthetic", seed=0), None, None, seed=0)
    texts = list(task.train[task.text_column])
    tokenizer = train_tokenizer_for(resolve_model_spec("tiny-bert", random_init=True), texts)
    longest = max(len(ids) for ids in tokenizer(texts, truncation=True, max_length=64)["input_ids"])
    assert m.longest_input_tokens == longest
    assert m.padded_tokens_per_s / m.samples_per_s < longest  # most batches are shorter than the worst


@pytest.mark.slow
def test_lever_axes_on_two_ranks_are_what_each_point_really_ran(tmp_path):
    """Both lever axes on 2 ranks of ZeRO-3, a causal LM: each point's ranks report (from the model and the
    optimizer that stepped) the levers its key names, and the measured breakdown shows what they change."""
    import math

    import torch
    from transformers import AutoModelForCausalLM

    from ftprof.train.models import resolve_model_spec

    out = tmp_path / "levers"
    sweep(
        ["--model", "tiny-llama", "--task", "causal-lm", "--zero", "3", "--world_size", "2"]
        + ["--offload", "none,optimizer+param", "--gradient_checkpointing", "off,on"]
        + ["--batch_sizes", "4", "--seq_lens", "64", "--out", str(out), "--no_report", "--no_remeasure"]
    )
    records = latest(read_records(out / "results.jsonl"))
    assert len(records) == 4
    assert {r.status for r in records} == {"ok"}
    with torch.device("meta"):
        numels = [
            p.numel() for p in AutoModelForCausalLM.from_config(resolve_model_spec("tiny-llama").config).parameters()
        ]
    partition = sum(math.ceil(n / 2) for n in numels)  # ZeRO-3: each parameter split in two (padded)
    saved = {}
    for r in records:
        p, offloaded = r.point, r.point.offload != "none"
        zero = r.ds_config["zero_optimization"]
        assert (zero.get("offload_param", {}).get("device") == "cpu") == offloaded
        assert [rank.rank for rank in r.profile.ranks] == [0, 1]
        for rank in r.profile.ranks:
            assert rank.levers == {
                "gradient_checkpointing": p.gradient_checkpointing,
                "offload_optimizer": offloaded,
                "offload_param": offloaded,
                "optimizer": "DeepSpeedCPUAdam" if offloaded else "FusedAdam",
                "optimizer_impl": None,  # DeepSpeed's own kernels
            }
            b = rank.breakdown
            assert b["parameters_fp32"] == 4 * partition  # this rank's half, not the model
            assert b["optimizer_states"] == 2 * 4 * partition  # Adam's two moments of that half
            # DeepSpeed 0.19's ZeRO-3 on a CPU keeps its fp32 partition as a copy even in fp32 (found by this
            # breakdown; stage3.py only shares it when the device names compare equal).
            assert b["master_weights"] == 4 * partition
            # The rank's fp32 gradient partition (one flat buffer); offload adds the host-side fp32 partition
            # its optimizer steps from beside the reduce-side one.
            assert b["gradients"] == 4 * partition * (2 if offloaded else 1)
            assert b["gradient_buckets"] == 4 * 64 * 64  # reduce_bucket_size "auto" = hidden^2 elements
            # Once the first step has traced the module order, the whole model stays gathered through the
            # backward: the shipped configs' stage3_max_live_parameters (1e9) is above its size.
            assert b["gathered_parameters"] == 4 * sum(numels)
        saved[(p.offload, p.gradient_checkpointing)] = {rank.breakdown["saved_activations"] for rank in r.profile.ranks}
    # Same batch on both ranks: same activations; offload doesn't change them; checkpointing lowers them.
    assert all(len(v) == 1 for v in saved.values())
    assert saved[("none", False)] == saved[("optimizer+param", False)]
    assert saved[("none", True)] == saved[("optimizer+param", True)]
    assert max(saved[("none", True)]) < max(saved[("none", False)])


@pytest.mark.slow
def test_memory_snapshot_writes_what_the_cpu_allows_and_the_records_name_it(tmp_path, capsys):
    """One rank and two ranks (both forked from the worker): every rank writes its profiled
    step's memory timeline (or, where torch's memory profiler fails on the op graph, the step's trace, and says
    so); no allocator snapshot without CUDA, and the sweep says why, once; the report lists the files. The
    two-rank ZeRO-2 point also carries test_sweep_grid_ranks_resume_and_report's two-rank ZeRO-2 checks: both
    ranks profiled, 4 x 2 samples a step, each seq_len tokens (the profiled step kept out of the window)."""
    out = tmp_path / "snap"
    proc = sweep(
        ["--zero", "2", "--world_size", "1,2", "--batch_sizes", "4", "--seq_lens", "32", "--memory_snapshot"]
        + ["--out", str(out), "--no_remeasure", "--no_report"]
    )
    assert " ".join(proc.stdout.split()).count("no allocator snapshot (.pickle) here") == 1  # rich wraps lines
    records = latest(read_records(out / "results.jsonl"))
    assert {r.status for r in records} == {"ok"}
    assert {r.run.worker for r in records} == {"fork"}  # two ranks too (tests/sweep/test_worker.py: = the launcher)
    check_two_rank_counts(next(r for r in records if r.point.key == "fp32-z2-w2-ga1-s32-b4"), 32)
    named = set()
    for r in records:
        assert [rank.rank for rank in r.profile.ranks] == list(range(r.point.world_size))
        assert r.profile.steady_steps == 2  # the profiled step is not in the window
        for rank in r.profile.ranks:
            stem = f"snapshots/{r.point.key}-rank{rank.rank}"
            timeline = [f"{stem}-timeline.html", f"{stem}-timeline.json"]
            if rank.memory_files == timeline:
                assert rank.memory_notes == []
                assert "data:image/png;base64," in (out / timeline[0]).read_text()
                times, sizes = json.loads((out / timeline[1]).read_text())
                assert len(times) == len(sizes) > 0
                assert max(sum(row) for row in sizes) > 0
            else:  # torch's memory profiler failed on this rank's step (seen now and then on a second gloo rank)
                assert rank.memory_files == [f"{stem}-trace.json"]
                assert "instead" in rank.memory_notes[0]
                assert json.loads((out / rank.memory_files[0]).read_text())["traceEvents"]
            named |= set(rank.memory_files)
            assert rank.allocator == {}  # CUDA only
    assert {f"snapshots/{p.name}" for p in (out / "snapshots").iterdir()} == named  # nothing unnamed, no .pickle
    assert all((out / f).stat().st_size > 0 for f in named)
    capsys.readouterr()
    assert ftprof_main(["report", str(out), "--format", "md"]) == 0
    report = capsys.readouterr().out
    assert "## Memory records" in report
    lines = [ln for ln in report.split("## Memory records", 1)[1].splitlines() if ln.startswith("- ")]
    assert lines
    assert all(f"{out}/snapshots/" in ln for ln in lines)
