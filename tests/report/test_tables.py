import csv
import io
import json

from rich.console import Console

from ftprof.report import exports
from ftprof.report import tables as views
from ftprof.report.recommend import recommend
from ftprof.units import GIB
from tests.report.test_recommend import RECORDS


def render_text(records, budget):
    console = Console(file=io.StringIO(), width=250, color_system=None)
    console.print(views.render(records, recommend(records, budget), budget))
    return console.file.getvalue()


def test_terminal_report_marks_oom_and_gives_commands():
    text = render_text(RECORDS, 10 * GIB)
    assert "OOM" in text
    assert "Pareto" in text
    assert (
        "Fastest under the budget: bf16-z2-w1-ga1-s128-b16 — peak 6.0 GiB, 180.0 samples/s, effective batch 16" in text
    )
    assert (
        "deepspeed --num_gpus 1 launch/train.py --ds_config ds_configs/zero2.json --model bert-base-uncased "
        "--per_device_train_batch_size 16 --gradient_accumulation_steps 1 --max_length 128 --bf16"
    ) in text
    assert "6 points: 5 ok, 1 oom." in text


def test_nothing_fits():
    assert "No measured point fits 1.0 GiB" in render_text(RECORDS, GIB)


def test_csv_export_loads_with_one_row_per_point():
    rows = list(csv.DictReader(io.StringIO(exports.to_csv(RECORDS))))
    assert len(rows) == len(RECORDS)
    oom = next(r for r in rows if r["status"] == "oom")
    assert (oom["batch_size"], oom["peak_gib"], oom["samples_per_s"]) == ("64", "", "")
    assert next(r for r in rows if r["batch_size"] == "16" and r["seq_len"] == "512")["peak_gib"] == "12.0"


def test_json_and_markdown_exports():
    recs = recommend(RECORDS, 10 * GIB)
    data = json.loads(exports.to_json(RECORDS, recs, 10 * GIB))
    assert data["budget_bytes"] == 10 * GIB
    assert len(data["points"]) == 6
    assert data["recommendations"][0]["ds_config"]["zero_optimization"]["stage"] == 2
    md = exports.to_markdown(RECORDS, recs, 10 * GIB)
    assert md.splitlines()[0].startswith("| precision | zero | world_size |")
    assert (
        "- **Largest effective batch** (among seq 128, 1 rank): `bf16-z3-w1-ga1-s128-b32`, peak 9.0 GiB, "
        "150.0 samples/s, effective batch 32"
    ) in md


def test_breakdown_of_the_highest_rank_and_the_rest_of_its_peak():
    from dataclasses import replace

    from ftprof.records.profile import Profile, RankProfile

    mib = 2**20
    ranks = [
        RankProfile(
            rank=0, figure="rss", phases={"steady": {"rss_bytes": 900 * mib}}, breakdown={"saved_activations": 1}
        ),
        RankProfile(
            rank=1,
            figure="rss",
            phases={"steady": {"rss_bytes": 1000 * mib}},
            breakdown={
                "parameters_bf16": 100 * mib,
                "parameters_fp32": 10 * mib,
                "master_weights": 200 * mib,
                "optimizer_states": 400 * mib,
                "gradients": 100 * mib,
                "saved_activations": 50 * mib,
            },
        ),
    ]
    fastest = RECORDS[1]
    measured = replace(fastest, peak_bytes=1000 * mib, profile=Profile(sampler="rss", samples_per_s=180, ranks=ranks))
    records = [measured if r is fastest else r for r in RECORDS]
    assert views.breakdown(measured) == {
        "params": 110 * mib,
        "master": 200 * mib,
        "optimizer": 400 * mib,
        "grads+buffers": 100 * mib,
        "saved act.": 50 * mib,
        "rest": 140 * mib,  # 1000 - 860: runtime, temporaries, allocator
    }
    assert views.breakdown(RECORDS[0]) is None  # no breakdown measured (older records)
    text = render_text(records, 10 * GIB)
    assert "Where the peak goes" in text
    assert "fastest" in text
    assert "140.0" in text
    md = exports.to_markdown(records, recommend(records, 10 * GIB), 10 * GIB)
    assert "| fastest | 110.0 | 200.0 | 400.0 | 100.0 | 50.0 | 140.0 |" in md


def test_offloaded_items_are_host_memory_not_part_of_the_device_peak():
    from dataclasses import replace

    from ftprof.records.profile import Profile, RankProfile

    mib = 2**20
    rank = RankProfile(
        rank=0,
        figure="process",
        phases={"steady": {"nvml_process_bytes": 1000 * mib}},
        breakdown={"parameters_bf16": 100 * mib, "master_weights_host": 200 * mib, "optimizer_states_host": 400 * mib},
    )
    r = replace(RECORDS[1], peak_bytes=1000 * mib, profile=Profile(sampler="nvml", samples_per_s=1, ranks=[rank]))
    parts = views.breakdown(r)
    assert parts["rest"] == 900 * mib
    assert parts["host"] == 600 * mib
    assert parts["optimizer"] == 0


def test_breakdown_plot_is_written_for_rows_and_skipped_without(tmp_path):
    from ftprof.report.plots import save_breakdown

    mib = 2**20
    rows = [("fastest", {"params": 10 * mib, "rest": 90 * mib}), ("memory_optimal", {"params": 5 * mib, "host": mib})]
    path = save_breakdown(rows, tmp_path)
    assert path == tmp_path / "breakdown.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert save_breakdown([], tmp_path / "none") is None


def test_memory_records_of_the_recommended_points_one_line_each(tmp_path):
    from dataclasses import replace

    from ftprof.records.profile import Profile, RankProfile

    def rank(r, peak):
        files = [f"snapshots/k-rank{r}.pickle", f"snapshots/k-rank{r}-timeline.html"]
        return RankProfile(rank=r, figure="rss", phases={"steady": {"rss_bytes": peak}}, memory_files=files)

    fastest = RECORDS[1]
    profile = Profile(sampler="rss", samples_per_s=180, ranks=[rank(0, 5), rank(1, 9), rank(2, 7)])
    records = [replace(r, profile=profile) if r is fastest else r for r in RECORDS]
    recs = recommend(records, 10 * GIB)
    lines = views.memory_records(recs, tmp_path)
    assert lines == [  # the highest-peak rank's files; the other picks measured none
        f"fastest: rank 1: {tmp_path}/snapshots/k-rank1.pickle, {tmp_path}/snapshots/k-rank1-timeline.html "
        "(ranks 0, 2 beside it)"
    ]
    console = Console(file=io.StringIO(), width=250, color_system=None)
    console.print(views.render(records, recs, 10 * GIB, tmp_path))
    assert "Memory records (sweep --memory_snapshot" in console.file.getvalue()
    assert lines[0] in console.file.getvalue()
    md = exports.to_markdown(records, recs, 10 * GIB, tmp_path)
    assert md.rstrip().endswith(f"- {lines[0]}")
    data = json.loads(exports.to_json(records, recs, 10 * GIB))
    assert data["recommendations"][0]["memory_files"] == [f for r in profile.ranks for f in r.memory_files]
    assert "Memory records" not in render_text(RECORDS, 10 * GIB)  # none measured: no section
