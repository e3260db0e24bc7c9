"""The caching-allocator model on hand-worked sequences: every expected number is derived in a comment from
the rules of c10/cuda/CUDACachingAllocator.cpp that ftprof.estimate.allocator cites."""

from __future__ import annotations

import random
import time

import pytest

from ftprof.errors import ConfigError
from ftprof.estimate.allocator import (
    MIB,
    AllocatorConfig,
    AllocatorOutOfMemory,
    CachingAllocatorModel,
    get_allocation_size,
    replay,
    round_size,
)

KB = 1024
EXPANDABLE = AllocatorConfig(expandable_segments=True)


def test_round_size_and_segment_size_follow_the_source_rules():
    # round_size: below 512 -> 512; otherwise up to a multiple of 512.
    assert round_size(1) == 512
    assert round_size(512) == 512
    assert round_size(513) == 1024
    assert round_size(600 * KB) == 600 * KB  # 614400 = 1200 x 512
    # roundup_power2_divisions=4 (above 512 x 4 bytes): 1 MiB + 1 lies in [1, 2) MiB cut into steps of 256 KiB
    # -> 1.25 MiB. 9 MiB + 1 with 2 divisions: [8, 16) MiB in steps of 4 MiB -> 12 MiB. A power of 2 stays.
    # Sizes <= 512 x divisions keep the 512 rounding: 1200 and 2000 with 4 divisions -> 1536 and 2048 (the
    # source's comment example, 1200 -> 1280, is roundup_power2_next_division alone; see its doctest).
    assert round_size(1 * MIB + 1, divisions=4) == 1310720
    assert round_size(1200, divisions=4) == 1536
    assert round_size(9 * MIB + 1, divisions=2) == 12 * MIB
    assert round_size(8 * MIB, divisions=4) == 8 * MIB
    assert round_size(2000, divisions=4) == 2048
    assert round_size(9 * MIB + 1, divisions=1) == 9 * MIB + 512
    # get_allocation_size: <= 1 MiB -> 2 MiB; < 10 MiB -> 20 MiB; else up to a multiple of 2 MiB.
    assert get_allocation_size(1 * MIB) == 2 * MIB
    assert get_allocation_size(1 * MIB + 512) == 20 * MIB
    assert get_allocation_size(10 * MIB - 512) == 20 * MIB
    assert get_allocation_size(10 * MIB) == 10 * MIB
    assert get_allocation_size(11 * MIB + 512) == 12 * MIB
    assert get_allocation_size(5 * MIB, large_segment_size=32 * MIB) == 32 * MIB


def test_one_byte_takes_a_2_mib_small_segment_and_counts_512_bytes():
    # 1 B -> round_size 512 <= 1 MiB: small pool; no cached block: cudaMalloc(kSmallBuffer = 2 MiB), split
    # (rest 2 MiB - 512 >= 512). allocated_bytes counts the block (512), requested_bytes the caller's 1.
    model = CachingAllocatorModel()
    model.malloc(1)
    s = model.stats()
    assert (s.reserved, s.allocated, s.requested, s.segments) == (2 * MIB, 512, 1, 1)
    assert model.snapshot() == [[(512, True), (2 * MIB - 512, False)]]


def test_three_600_kb_blocks_share_one_small_segment_and_a_fourth_needs_another():
    # 600 KB = 614400 B (a multiple of 512). Segment 2097152 B: after three, 2097152 - 3 x 614400 = 253952 B
    # stay free, too small for a fourth -> a second 2 MiB segment.
    model = CachingAllocatorModel()
    for _ in range(3):
        model.malloc(600 * KB)
    s = model.stats()
    assert (s.reserved, s.allocated, s.segments) == (2 * MIB, 1843200, 1)
    assert model.snapshot() == [[(614400, True)] * 3 + [(253952, False)]]
    model.malloc(600 * KB)
    s = model.stats()
    assert (s.reserved, s.allocated, s.segments) == (4 * MIB, 2457600, 2)


def test_a_5_mib_request_gets_a_20_mib_segment_which_the_next_one_shares():
    # 5 MiB: large pool (> 1 MiB), < 10 MiB -> kLargeBuffer 20 MiB segment; split since the rest, 15 MiB, is
    # > 1 MiB. The second 5 MiB best-fits the 15 MiB block and splits it again (rest 10 MiB).
    model = CachingAllocatorModel()
    model.malloc(5 * MIB)
    assert (model.stats().reserved, model.stats().allocated) == (20 * MIB, 5 * MIB)
    model.malloc(5 * MIB)
    s = model.stats()
    assert (s.reserved, s.allocated, s.segments) == (20 * MIB, 10 * MIB, 1)
    assert model.snapshot() == [[(5 * MIB, True), (5 * MIB, True), (10 * MIB, False)]]


def test_requests_of_10_mib_and_more_get_their_size_rounded_to_2_mib():
    # 12 MiB: >= kMinLargeAlloc -> segment 12 MiB exactly (a multiple of kRoundLarge), nothing left to split.
    assert replay([("alloc", "a", 12 * MIB)]).reserved == 12 * MIB
    # 11 MiB + 1 -> block 11 MiB + 512 -> segment 12 MiB; the rest, 1 MiB - 512, is not > 1 MiB: no split,
    # so allocated counts the whole 12 MiB block while requested is the caller's 11 MiB + 1.
    s = replay([("alloc", "a", 11 * MIB + 1)])
    assert (s.reserved, s.allocated, s.requested) == (12 * MIB, 12 * MIB, 11 * MIB + 1)


def test_a_freed_block_is_reused_without_growing_reserved():
    # free keeps the 12 MiB segment cached; the same request best-fits it: no second cudaMalloc.
    s = replay([("alloc", "a", 12 * MIB), ("free", "a"), ("alloc", "b", 12 * MIB)])
    assert (s.reserved, s.max_reserved, s.segments, s.num_device_alloc) == (12 * MIB, 12 * MIB, 1, 1)


def test_split_then_coalesce_lets_a_large_request_reuse_the_merged_hole():
    # 20 MiB segment: A [0,5) B [5,10) free [10,20). Free A -> free blocks 5 MiB @0 and 10 MiB @10.
    # C = 3 MiB best-fits the 5 MiB hole (not the 10 MiB one) and splits it: rest 2 MiB > 1 MiB.
    model = CachingAllocatorModel()
    a, b = model.malloc(5 * MIB), model.malloc(5 * MIB)
    model.free(a)
    model.malloc(3 * MIB)
    assert model.snapshot() == [[(3 * MIB, True), (2 * MIB, False), (5 * MIB, True), (10 * MIB, False)]]
    # Freeing B merges it with both free neighbours: 2 + 5 + 10 = 17 MiB, which a 17 MiB request fits exactly
    # (without merging it would need a new 18 MiB segment).
    model.free(b)
    assert model.snapshot() == [[(3 * MIB, True), (17 * MIB, False)]]
    model.malloc(17 * MIB)
    s = model.stats()
    assert (s.reserved, s.allocated, s.segments) == (20 * MIB, 20 * MIB, 1)


def test_a_large_block_is_split_only_when_more_than_1_mib_remains():
    # A cached 12 MiB block: 11 MiB leaves exactly 1 MiB, not > kSmallSize -> handed out whole (allocated
    # 12 MiB); the 1.5 MiB request then needs its own 20 MiB segment: 32 MiB reserved.
    whole = replay([("alloc", "a", 12 * MIB), ("free", "a"), ("alloc", "b", 11 * MIB), ("alloc", "c", 3 * MIB // 2)])
    assert (whole.allocated, whole.reserved) == (12 * MIB + 3 * MIB // 2, 32 * MIB)
    # 10.5 MiB leaves 1.5 MiB > 1 MiB -> split; the 1.5 MiB request fits the rest exactly: 12 MiB reserved.
    split = replay(
        [("alloc", "a", 12 * MIB), ("free", "a"), ("alloc", "b", 21 * MIB // 2), ("alloc", "c", 3 * MIB // 2)]
    )
    assert (split.allocated, split.reserved) == (12 * MIB, 12 * MIB)


def test_max_split_size_keeps_oversize_blocks_whole_and_for_large_requests_only():
    config = AllocatorConfig(max_split_size=40 * MIB)
    # A cached 50 MiB block (>= max_split_size): a 45 MiB request (>= 40 MiB) may take it, as 50 < 45 + 20
    # (max_non_split_rounding_size), but may not split it: allocated 50 MiB.
    s = replay([("alloc", "a", 50 * MIB), ("free", "a"), ("alloc", "b", 45 * MIB)], config)
    assert (s.allocated, s.reserved) == (50 * MIB, 50 * MIB)
    # A 30 MiB request (< max_split_size) may not use the oversize block: a new 30 MiB segment, 80 MiB.
    s = replay([("alloc", "a", 50 * MIB), ("free", "a"), ("alloc", "b", 30 * MIB)], config)
    assert (s.allocated, s.reserved, s.segments) == (30 * MIB, 80 * MIB, 2)
    # 70 MiB cached, 48 MiB asked: 70 >= 48 + 20 -> too much rounding: a new 48 MiB segment, 118 MiB.
    s = replay([("alloc", "a", 70 * MIB), ("free", "a"), ("alloc", "b", 48 * MIB)], config)
    assert (s.allocated, s.reserved) == (48 * MIB, 118 * MIB)
    # Without max_split_size the 30 MiB request splits the 50 MiB block (rest 20 MiB > 1 MiB).
    s = replay([("alloc", "a", 50 * MIB), ("free", "a"), ("alloc", "b", 30 * MIB)])
    assert (s.allocated, s.reserved, s.segments) == (30 * MIB, 50 * MIB, 1)


def test_roundup_power2_divisions_changes_both_block_and_segment():
    # 9 MiB + 1: plain rounding gives 9 MiB + 512 (< 10 MiB -> a 20 MiB segment); with 2 divisions the block
    # is 12 MiB (>= 10 MiB -> a 12 MiB segment).
    plain = replay([("alloc", "a", 9 * MIB + 1)])
    assert (plain.allocated, plain.reserved) == (9 * MIB + 512, 20 * MIB)
    power2 = replay([("alloc", "a", 9 * MIB + 1)], AllocatorConfig(roundup_power2_divisions=2))
    assert (power2.allocated, power2.reserved) == (12 * MIB, 12 * MIB)


def test_blocks_are_reused_on_their_own_stream_only():
    # The 12 MiB block freed on stream 0 is invisible to stream 1: a second segment.
    s = replay([("alloc", "a", 12 * MIB, 0), ("free", "a"), ("alloc", "b", 12 * MIB, 1)])
    assert (s.reserved, s.segments) == (24 * MIB, 2)


def test_expandable_segments_grow_by_pages_and_share_one_segment():
    # 5 MiB: one large-pool page (20 MiB) mapped; split with any rest >= 512 B. The second 5 MiB takes the
    # rest's front. No cudaMalloc segment is counted, one expandable segment is live.
    model = CachingAllocatorModel(EXPANDABLE)
    model.malloc(5 * MIB)
    model.malloc(5 * MIB)
    s = model.stats()
    assert (s.reserved, s.allocated, s.segments, s.expandable_segments) == (20 * MIB, 10 * MIB, 0, 1)
    # 30 MiB: the free 10 MiB tail [10,20) plus one more page [20,40) -> one 30 MiB block, 40 MiB reserved
    # (non-expandable: a separate 30 MiB segment, 50 MiB).
    model.malloc(30 * MIB)
    assert model.stats().reserved == 40 * MIB
    assert model.snapshot() == [[(5 * MIB, True), (5 * MIB, True), (30 * MIB, True)]]
    assert replay([("alloc", i, n * MIB) for i, n in enumerate((5, 5, 30))]).reserved == 50 * MIB


def test_expandable_pages_can_cost_more_than_segments_for_lone_requests():
    # 12 MiB x 3. Expandable: page [0,20) -> 12 + free 8; the second needs 4 MiB more -> page [20,40), free 28
    # -> 12 + free 16; the third fits the 16: 40 MiB. cudaMalloc: three 12 MiB segments, 36 MiB.
    events = [("alloc", i, 12 * MIB) for i in range(3)]
    assert replay(events, EXPANDABLE).reserved == 40 * MIB
    assert replay(events).reserved == 36 * MIB
    # One 12 MiB request alone: a whole 20 MiB page against a 12 MiB segment.
    assert replay(events[:1], EXPANDABLE).reserved == 20 * MIB


def test_expandable_splits_large_blocks_down_to_512_bytes():
    # 19.5 MiB: expandable maps one 20 MiB page and splits off the 0.5 MiB rest (>= 512 B), so allocated is
    # 19.5 MiB; without expandable the 20 MiB segment (>= 10 MiB, rounded to 2 MiB) stays whole (rest 0.5 MiB
    # is not > 1 MiB) and allocated is 20 MiB.
    assert replay([("alloc", "a", 39 * MIB // 2)], EXPANDABLE).allocated == 39 * MIB // 2
    assert replay([("alloc", "a", 39 * MIB // 2)]).allocated == 20 * MIB


def test_expandable_small_pool_uses_2_mib_pages():
    # Four 600 KB blocks: the first page holds three (253952 B left); the fourth maps a second 2 MiB page.
    s = replay([("alloc", i, 600 * KB) for i in range(4)], EXPANDABLE)
    assert (s.reserved, s.allocated, s.expandable_segments) == (4 * MIB, 2457600, 1)


def test_best_fit_in_expandable_segments_prefers_blocks_that_cannot_grow():
    # Page [0,20): A 6 MiB, B 10 MiB, free tail [16,20) 4 MiB before unmapped space. Free A -> free [0,6).
    # A 4 MiB request: lower_bound finds the tail (4 MiB) first, but it can grow into the unmapped space, so
    # get_free_block moves on to the 6 MiB block, which can't: C lands at [0,4), leaving 2 MiB there.
    model = CachingAllocatorModel(EXPANDABLE)
    a = model.malloc(6 * MIB)
    model.malloc(10 * MIB)
    model.free(a)
    model.malloc(4 * MIB)
    assert model.snapshot() == [[(4 * MIB, True), (2 * MIB, False), (10 * MIB, True), (4 * MIB, False)]]


def test_empty_cache_releases_only_wholly_free_segments():
    # A 5 MiB (in a 20 MiB segment, 15 MiB left free), B 16 MiB (too big for the 15: its own 16 MiB segment),
    # C 600 KB (a 2 MiB small segment): 38 MiB. Free B and C; empty_cache frees their segments (unsplit once
    # free); A's segment is split and stays.
    model = CachingAllocatorModel()
    a, b, c = model.malloc(5 * MIB), model.malloc(16 * MIB), model.malloc(600 * KB)
    model.free(b)
    model.free(c)
    model.empty_cache()
    s = model.stats()
    assert (s.reserved, s.max_reserved, s.segments, s.num_device_free) == (20 * MIB, 38 * MIB, 1, 2)
    model.free(a)
    model.empty_cache()
    assert (model.stats().reserved, model.stats().segments) == (0, 0)


def test_empty_cache_unmaps_whole_free_pages_of_expandable_segments():
    # 5 + 5 + 30 MiB -> blocks [0,5) [5,10) [10,40), pages [0,20) [20,40): 40 MiB. Free the 30 MiB block:
    # empty_cache unmaps only pages wholly inside it, [20,40) -> 20 MiB; [10,20) shares page 0 with live
    # blocks and stays mapped.
    model = CachingAllocatorModel(EXPANDABLE)
    x, y, z = (model.malloc(n * MIB) for n in (5, 5, 30))
    model.free(z)
    model.empty_cache()
    assert model.stats().reserved == 20 * MIB
    assert model.snapshot() == [[(5 * MIB, True), (5 * MIB, True), (10 * MIB, False)]]
    # Free the rest: page 0 unmaps and the whole segment, now unmapped, is released.
    model.free(x)
    model.free(y)
    model.empty_cache()
    s = model.stats()
    assert (s.reserved, s.max_reserved, s.expandable_segments) == (0, 40 * MIB, 0)


def test_peak_reserved_is_the_maximum_over_time():
    # 30 MiB segment, freed and released (0), then a 5 MiB request's 20 MiB segment: now 20, peak 30;
    # reset_peak_stats restarts the peak at 20.
    model = CachingAllocatorModel()
    model.free(model.malloc(30 * MIB))
    model.empty_cache()
    model.malloc(5 * MIB)
    s = model.stats()
    assert (s.reserved, s.max_reserved, s.max_allocated) == (20 * MIB, 30 * MIB, 30 * MIB)
    model.reset_peak_stats()
    assert (model.stats().max_reserved, model.stats().max_allocated) == (20 * MIB, 5 * MIB)


def test_out_of_memory_frees_the_cache_and_retries():
    # Capacity 21 MiB: a cached (free) 20 MiB segment leaves no room for a 2 MiB small segment (22 > 21), so
    # malloc releases the cached blocks (one cudaFree) and retries (one retry): 2 MiB reserved, peak 20.
    model = CachingAllocatorModel(AllocatorConfig(capacity=21 * MIB))
    model.free(model.malloc(20 * MIB))
    model.malloc(600 * KB)
    s = model.stats()
    assert (s.reserved, s.max_reserved, s.num_device_free, s.num_alloc_retries, s.num_ooms) == (
        2 * MIB,
        20 * MIB,
        1,
        1,
        0,
    )


def test_out_of_memory_raises_when_nothing_cached_can_go():
    # 30 MiB live of 40 MiB: a 12 MiB segment can't fit (42 > 40) and nothing is cached: OutOfMemoryError.
    model = CachingAllocatorModel(AllocatorConfig(capacity=40 * MIB))
    model.malloc(30 * MIB)
    with pytest.raises(AllocatorOutOfMemory, match="12.00 MiB"):
        model.malloc(12 * MIB)
    s = model.stats()
    assert (s.num_ooms, s.num_alloc_retries, s.reserved) == (1, 1, 30 * MIB)


def test_out_of_memory_first_releases_oversize_blocks_under_max_split_size():
    # max_split_size 20 MiB, capacity 45 MiB. A cached 30 MiB block is oversize: a 5 MiB request may not use
    # it, and its 20 MiB segment doesn't fit (50 > 45). release_available_cached_blocks frees the smallest
    # cached block >= max(5, 20) MiB, the 30 MiB one, and the plain second try succeeds (not a "retry").
    model = CachingAllocatorModel(AllocatorConfig(max_split_size=20 * MIB, capacity=45 * MIB))
    model.free(model.malloc(30 * MIB))
    model.malloc(5 * MIB)
    s = model.stats()
    assert (s.reserved, s.max_reserved, s.num_device_free, s.num_alloc_retries) == (20 * MIB, 30 * MIB, 1, 0)


def test_out_of_memory_with_expandable_segments_unmaps_free_pages_and_retries():
    # Capacity 40 MiB. 30 MiB maps two 20 MiB pages (40 MiB); freed, they stay mapped. A 600 KB request
    # opens a small-pool segment whose first 2 MiB page can't be mapped (42 > 40); release_cached_blocks
    # unmaps both free large pages and releases that segment; the retry maps the 2 MiB page.
    model = CachingAllocatorModel(AllocatorConfig(expandable_segments=True, capacity=40 * MIB))
    model.free(model.malloc(30 * MIB))
    model.malloc(600 * KB)
    s = model.stats()
    assert (s.reserved, s.max_reserved, s.expandable_segments, s.num_alloc_retries) == (2 * MIB, 40 * MIB, 1, 1)


def test_garbage_collection_frees_the_older_cached_blocks_first():
    # Fraction 0.5 of 200 MiB -> 100 MiB allowed; threshold 0.25 -> collect above 25 MiB reserved. Each
    # large-pool lookup ticks the pool's counter: malloc A (1), free A (A's age base 1), malloc B (2, 12 MiB
    # reserved: no collection), free B (base 2), malloc C = 16 MiB (3, no fit): 26 MiB > 25 -> ages A 2, B 1,
    # mean 1.5 -> only A goes. Reserved 26 - 12 + 16 = 30 MiB; B stays cached and D = 14 MiB reuses it.
    config = AllocatorConfig(capacity=200 * MIB, memory_fraction=0.5, garbage_collection_threshold=0.25)
    model = CachingAllocatorModel(config)
    model.free(model.malloc(12 * MIB))
    model.free(model.malloc(14 * MIB))
    model.malloc(16 * MIB)
    assert (model.stats().reserved, model.stats().num_device_free) == (30 * MIB, 1)
    model.malloc(14 * MIB)
    assert (model.stats().reserved, model.stats().segments) == (30 * MIB, 2)
    # A lone candidate is as old as the mean (the test is >=) and goes: A cached (base 1), B = 14 MiB live
    # (lookup 2), C = 16 MiB (lookup 3, 26 MiB > 25): A's age 2 = mean 2 -> freed: 14 + 16 = 30 MiB.
    model = CachingAllocatorModel(config)
    model.free(model.malloc(12 * MIB))
    model.malloc(14 * MIB)
    model.malloc(16 * MIB)
    assert (model.stats().reserved, model.stats().max_reserved) == (30 * MIB, 30 * MIB)
    # Without garbage collection the three segments stay: 42 MiB.
    plain = replay(
        [("alloc", "a", 12 * MIB), ("free", "a"), ("alloc", "b", 14 * MIB), ("free", "b")] + [("alloc", "c", 16 * MIB)]
    )
    assert plain.reserved == 42 * MIB


def test_memory_fraction_caps_reserved_before_cudamalloc():
    # Fraction 0.5 of 40 MiB: 20 MiB allowed. 12 MiB fits; a second 12 MiB would reach 24 > 20 -> OOM.
    model = CachingAllocatorModel(AllocatorConfig(capacity=40 * MIB, memory_fraction=0.5))
    model.malloc(12 * MIB)
    with pytest.raises(AllocatorOutOfMemory):
        model.malloc(12 * MIB)


def test_replay_handles_zero_bytes_empty_cache_and_bad_events():
    # A 0-byte tensor gets no block; empty_cache as an event releases the freed 12 MiB segment.
    s = replay([("alloc", "z", 0), ("alloc", "a", 12 * MIB), ("free", "a"), ("free", "z"), ("empty_cache",)])
    assert (s.reserved, s.max_reserved, s.allocated, s.max_allocated) == (0, 12 * MIB, 0, 12 * MIB)
    with pytest.raises(ValueError, match="'a': already allocated"):
        replay([("alloc", "a", 1), ("alloc", "a", 1)])
    with pytest.raises(ValueError, match="'b': not allocated"):
        replay([("free", "b")])
    with pytest.raises(ValueError, match="expected 'alloc'"):
        replay([("resize", "a")])
    model = CachingAllocatorModel()
    handle = model.malloc(1)
    model.free(handle)
    with pytest.raises(ValueError, match="not allocated"):
        model.free(handle)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_split_size", 10 * MIB, ">= large_segment_size"),
        ("max_non_split_rounding_size", 1 * MIB, ">= large_segment_size"),
        ("large_segment_size", 10 * MIB, "> 10 MiB"),
        ("roundup_power2_divisions", 3, "power of 2"),
        ("garbage_collection_threshold", 1.0, r"\(0.0, 1.0\)"),
        ("memory_fraction", 0.5, "needs a capacity"),
    ],
)
def test_config_bounds_are_torch_2_13s(field, value, message):
    # torch 2.13's parser: max_split_size_mb / max_non_split_rounding_mb "too small, must be >= 20" (the
    # large_segment_size_mb), large_segment_size_mb "must be > 10 MB", divisions a power of 2,
    # garbage_collection_threshold in (0.0, 1.0).
    with pytest.raises(ConfigError, match=message):
        AllocatorConfig(**{field: value})
    assert AllocatorConfig(max_split_size=20 * MIB).max_split_size == 20 * MIB


def test_a_hundred_thousand_events_replay_quickly():
    rng, events, live = random.Random(0), [], []
    for n in range(100_000):
        if live and rng.random() < 0.5:
            events.append(("free", live.pop(rng.randrange(len(live)))))
        else:
            events.append(("alloc", n, rng.choice([rng.randrange(1, MIB), rng.randrange(MIB, 64 * MIB)])))
            live.append(n)
    start = time.perf_counter()
    s = replay(events)
    assert time.perf_counter() - start < 5  # about 0.3 s alone on one core; generous for shared CI machines
    assert s.max_reserved >= s.max_allocated >= s.max_requested > 0
