import pytest

from ftprof.errors import ConfigError
from ftprof.point import Point, parse_int_list, parse_precisions, parse_zero
from ftprof.sweep.plan import adapter_axis, must_oom, next_batch_to_try, plan_grid
from ftprof.units import parse_size


def test_grid_is_the_full_product_smallest_first():
    points = plan_grid([16, 8], [1, 4], ["bf16"], [256, 128], [0, 3], [1])
    assert len(points) == 2 * 2 * 2 * 2
    assert points[0] == Point(precision="bf16", zero=0, world_size=1, grad_accum=1, seq_len=128, batch_size=8)
    assert points == sorted(points)
    assert len({p.key for p in points}) == len(points)


def test_effective_batch_derives_accumulation():
    points = plan_grid([4, 8, 16, 24], [1], ["fp32"], [128], [2], [2], effective_batch=64)
    assert sorted((p.batch_size, p.grad_accum) for p in points) == [(4, 8), (8, 4), (16, 2)]  # 24*2 doesn't divide 64
    assert {p.effective_batch() for p in points} == {64}
    with pytest.raises(ConfigError, match="no micro-batch"):
        plan_grid([3], [1], ["fp32"], [128], [2], [1], effective_batch=64)


@pytest.mark.parametrize(
    ("text", "flag"),
    [
        ("8,x", "--batch_sizes"),
        ("0,8", "--batch_sizes"),
        ("-4", "--seq_lens"),
        ("", "--grad_accum"),
        ("1.5", "--steps"),
    ],
)
def test_grid_values_must_be_positive_integers(text, flag):
    with pytest.raises(ConfigError, match=f"{flag} .*is not a positive integer"):
        parse_int_list(text, flag)


def test_precision_and_zero_parsing():
    assert parse_precisions("bf16, fp32") == ["fp32", "bf16"]
    with pytest.raises(ConfigError, match="unknown precision 'fp8'"):
        parse_precisions("fp16,fp8")
    assert parse_zero("3,0,2") == [0, 2, 3]
    with pytest.raises(ConfigError, match="unknown ZeRO stage '4'"):
        parse_zero("2,4")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24GiB", 24 * 2**30),
        ("24GB", 24 * 2**30),
        ("80g", 80 * 2**30),
        ("512MiB", 2**29),
        ("1.5T", int(1.5 * 2**40)),
        ("4096", 4096),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["lots", "24 GiBs", "-1G", ""])
def test_unparsable_budget(text):
    with pytest.raises(ConfigError, match="--budget .*not a size"):
        parse_size(text)


def test_must_oom_needs_everything_else_equal():
    oom = Point(precision="fp32", zero=2, world_size=1, grad_accum=1, seq_len=256, batch_size=16)
    assert (
        must_oom(Point(precision="fp32", zero=2, world_size=1, grad_accum=1, seq_len=256, batch_size=32), [oom]) == oom
    )
    assert (
        must_oom(Point(precision="fp32", zero=2, world_size=1, grad_accum=1, seq_len=512, batch_size=16), [oom]) == oom
    )
    assert (
        must_oom(Point(precision="fp32", zero=2, world_size=1, grad_accum=1, seq_len=128, batch_size=32), [oom]) is None
    )  # shorter sequence: may fit
    assert (
        must_oom(Point(precision="fp32", zero=3, world_size=1, grad_accum=1, seq_len=256, batch_size=32), [oom]) is None
    )  # other ZeRO stage
    assert (
        must_oom(Point(precision="bf16", zero=2, world_size=1, grad_accum=1, seq_len=256, batch_size=32), [oom]) is None
    )


def simulate_search(limit: int, start: int = 8, cap: int = 1024) -> tuple[int | None, list[int]]:
    fits, ooms, tried = set(), set(), []
    while (b := next_batch_to_try(fits, ooms, start, cap)) is not None:
        tried.append(b)
        (fits if b <= limit else ooms).add(b)
    return (max(fits) if fits else None), tried


@pytest.mark.parametrize("limit", [1, 5, 8, 13, 100, 127, 1000, 5000])
def test_bisection_finds_the_largest_batch_that_fits(limit):
    found, tried = simulate_search(limit)
    assert found == min(limit, 1024)
    assert len(tried) == len(set(tried)) <= 2 * 11  # doubling then bisection: logarithmic


def test_lever_axes_sweep_where_each_stage_supports_them():
    points = plan_grid(
        [8],
        [1],
        ["bf16"],
        [128],
        [0, 2, 3],
        [1],
        offloads=["none", "optimizer", "optimizer+param"],
        checkpointing=[False, True],
    )
    combos = sorted({(p.zero, p.offload, p.gradient_checkpointing) for p in points})
    assert combos == sorted(
        (z, o, c)
        for z, offs in ((0, ["none"]), (2, ["none", "optimizer"]), (3, ["none", "optimizer", "optimizer+param"]))
        for o in offs
        for c in (False, True)
    )
    assert len({p.key for p in points}) == len(points) == 12
    with pytest.raises(ConfigError, match="--offload optimizer needs ZeRO stage 1, 2 or 3"):
        plan_grid([8], [1], ["bf16"], [128], [0], [1], offloads=["optimizer"])


def test_the_peft_axis_adds_each_lora_rank_beside_full_fine_tuning():
    points = plan_grid([4, 8], [1], ["bf16"], [64], [2, 3], [1], adapters=adapter_axis(["none", "lora"], [8, 64]))
    assert len(points) == 2 * 2 * 3
    assert sorted({(p.peft, p.lora_r) for p in points}) == [("lora", 8), ("lora", 64), ("none", 0)]
    assert len({p.key for p in points}) == len(points)
    assert must_oom(points[0].with_batch(8), [points[0]]) == points[0]  # same adapters: proof
    lora = next(p for p in points if p.peft == "lora")
    assert must_oom(lora.with_batch(8), [p for p in points if p.peft == "none"]) is None  # another model
    r64 = next(p for p in points if p.lora_r == 64 and p.batch_size == 4)
    assert must_oom(r64.with_batch(8), [lora]) is None  # another rank: no proof either
    assert {p.peft for p in plan_grid([4], [1], ["bf16"], [64], [2], [1])} == {"none"}  # no axis: full


def test_zero_none_is_a_point_without_deepspeed_that_offloads_nothing():
    """--zero none,2 --offload none,optimizer: HF Trainer's point has no offload; ZeRO-2 has both."""
    from ftprof.point import parse_stages

    points = plan_grid([4], [1], ["fp32"], [64], parse_stages("2,none"), [1], offloads=["none", "optimizer"])
    assert [p.key for p in points] == [
        "fp32-znone-w1-ga1-s64-b4",
        "fp32-z2-w1-ga1-s64-b4",
        "fp32-z2-w1-ga1-s64-b4-off_optimizer",
    ]
    plain = points[0]
    assert (plain.deepspeed, plain.zero, plain.stage, plain.engine) == (False, 0, "none", "no DeepSpeed")
    with pytest.raises(ConfigError, match="--offload optimizer needs ZeRO stage 1, 2 or 3, and --zero has none"):
        plan_grid([4], [1], ["fp32"], [64], ["none"], [1], offloads=["optimizer"])
    with pytest.raises(ConfigError, match="--zero none .* partitions and offloads nothing"):
        Point(precision="fp32", zero=2, deepspeed=False, seq_len=64, batch_size=4)
    with pytest.raises(ConfigError, match="--zero 'none,5': use none"):
        parse_stages("none,5")
