"""A replay model of PyTorch's CUDA caching allocator: feed it the traced malloc/free sequence, read
``max_memory_reserved`` (and ``max_memory_allocated``) off it.

Source read. The model follows ``DeviceCachingAllocator`` in ``c10/cuda/CUDACachingAllocator.cpp`` as stored
for pytorch/pytorch at commit ``001074d25084fdb87a799823e395a50f5ec044d3`` (a 2.4/2.5-era ``main``; the
2.13 ``.cpp`` is not in the CPU wheel and no 2.13 copy could be fetched). Checked against torch 2.13.0 itself
(``cf30153c``): its installed headers ``c10/core/AllocatorConfig.h`` (the constants below, unchanged, and
the knob ``large_segment_size``, 20 MiB by default, which in 2.13 stands where 2.4 has the constant
``kLargeBuffer``) and its config parser, run through ``torch._C._accelerator_setAllocatorSettings``, for
every bound :class:`AllocatorConfig` checks. Not confirmed for 2.13: that the ``.cpp`` functions cited
below are unchanged since that commit, in particular that ``get_allocation_size`` and the large pool's
expandable page use ``large_segment_size`` (a third-party reading of a 2.9+ ``main`` says
``get_allocation_size`` does; identical at the default), and the address order of cudaMalloc results
(only the tie between equal-sized free blocks depends on it: the model gives later segments higher
addresses).

Modelled: rounding (``round_size``, ``roundup_power2_divisions``), small/large pools per stream, segment
sizes (``get_allocation_size``), best fit (``get_free_block`` with its ``max_split_size`` and
``max_non_split_rounding_size`` limits), splitting (``should_split``, ``alloc_found_block``), coalescing
(``free_block``/``try_merge_blocks``), the OOM path of ``malloc`` (``release_available_cached_blocks``,
``release_cached_blocks``, retry), ``garbage_collection_threshold`` (with a memory fraction), and
``expandable_segments`` (``try_allocate_expandable_block``, ``map_block``, ``unmap_block``). Not modelled:
cross-stream use (``record_stream`` events), CUDA-graph private pools, free-memory callbacks. A zero-byte
request allocates nothing (``NativeCachingAllocator::allocate`` skips ``malloc`` for size 0). One departure:
``release_available_cached_blocks`` on an expandable block gives up where torch's ``release_block`` would
assert. Stats are the aggregate over pools; ``segments`` counts cudaMalloc segments as torch's ``segment``
stat does, so it stays 0 under expandable segments (see ``expandable_segments`` instead).
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ftprof.errors import ConfigError, FtprofError

MIB = 2**20
# c10/core/AllocatorConfig.h (2.13; in 2.4 at the top of CUDACachingAllocator.cpp):
K_MIN_BLOCK_SIZE = 512  # all sizes are rounded to at least 512 bytes
K_SMALL_SIZE = 1 * MIB  # largest "small" allocation: requests <= 1 MiB use the small pool
K_SMALL_BUFFER = 2 * MIB  # "small" allocations are packed in 2 MiB segments (and 2 MiB expandable pages)
K_MIN_LARGE_ALLOC = 10 * MIB  # requests between 1 and 10 MiB get a large_segment_size segment
K_ROUND_LARGE = 2 * MIB  # larger requests get a segment of their size rounded up to 2 MiB
K_LARGE_BUFFER = 20 * MIB  # kLargeBuffer; 2.13: AcceleratorAllocatorConfig::large_segment_size_ default


class AllocatorOutOfMemory(FtprofError):
    """The replayed sequence does not fit: ``malloc`` would raise ``torch.OutOfMemoryError``."""


@dataclass(frozen=True)
class AllocatorConfig:
    """``PYTORCH_CUDA_ALLOC_CONF`` as the model needs it, in bytes; bounds as torch 2.13's parser checks them."""

    expandable_segments: bool = False
    """``expandable_segments:True``: one segment per stream and pool, grown by mapping pages."""
    max_split_size: int | None = None
    """``max_split_size_mb`` in bytes; None is torch's default (unlimited: every block may be split)."""
    max_non_split_rounding_size: int = K_LARGE_BUFFER
    """``max_non_split_rounding_mb``: how much larger than a request >= max_split_size a reused block may be."""
    roundup_power2_divisions: int | None = None
    """``roundup_power2_divisions:N`` (one value for all sizes); None or 1 rounds to 512 bytes only."""
    large_segment_size: int = K_LARGE_BUFFER
    """``large_segment_size_mb``: the segment for 1-10 MiB requests and the large pool's expandable page."""
    capacity: int | None = None
    """Bytes cudaMalloc can hand this process (device memory less context and others); None: unlimited."""
    memory_fraction: float | None = None
    """``torch.cuda.set_per_process_memory_fraction``: the allocator's own cap, a fraction of ``capacity``."""
    garbage_collection_threshold: float | None = None
    """``garbage_collection_threshold``: reclaim old cached blocks above this share of the fraction cap."""

    def __post_init__(self) -> None:
        sizes = {"max_split_size": self.max_split_size, "max_non_split_rounding_size": self.max_non_split_rounding_size}
        if self.large_segment_size % MIB or self.large_segment_size <= K_MIN_LARGE_ALLOC:
            raise ConfigError(f"large_segment_size {self.large_segment_size!r}: must be whole MiB, > 10 MiB")
        for name, value in sizes.items():  # torch: "too small, must be >= <large_segment_size_mb>"
            if value is not None and (value % MIB or value < self.large_segment_size):
                raise ConfigError(f"{name} {value!r}: must be whole MiB, >= large_segment_size")
        divisions = self.roundup_power2_divisions
        if divisions is not None and (divisions < 1 or divisions & (divisions - 1)):
            raise ConfigError(f"roundup_power2_divisions {divisions!r}: must be a power of 2")
        if self.memory_fraction is not None and (self.capacity is None or not 0 < self.memory_fraction <= 1):
            raise ConfigError(f"memory_fraction {self.memory_fraction!r}: needs a capacity and a value in (0, 1]")
        gc = self.garbage_collection_threshold
        if gc is not None and not 0 < gc < 1:
            raise ConfigError(f"garbage_collection_threshold {gc!r}: set it in (0.0, 1.0)")

    @property
    def split_limit(self) -> float:
        """max_split_size, or infinity for torch's SIZE_MAX default."""
        return float("inf") if self.max_split_size is None else self.max_split_size


def _roundup_power2_next_division(size: int, divisions: int) -> int:
    """DeviceCachingAllocator::roundup_power2_next_division: the next of ``divisions`` steps between powers of 2.

    >>> _roundup_power2_next_division(1200, 4), _roundup_power2_next_division(1024, 4)
    (1280, 1024)
    """
    if size & (size - 1) == 0:
        return size
    power2_floor = 1 << (size.bit_length() - 1)
    division = power2_floor >> (divisions.bit_length() - 1)  # >> (63 - clz(divisions))
    if division == 0:
        return power2_floor << 1
    floor = size & ~(division - 1)
    return size if floor == size else floor + division


def round_size(size: int, divisions: int | None = None) -> int:
    """DeviceCachingAllocator::round_size: the block size a request of ``size`` bytes asks for.

    >>> round_size(1), round_size(513), round_size(5 * MIB + 1), round_size(5 * MIB + 1, divisions=4)
    (512, 1024, 5243392, 6291456)
    """
    if size < K_MIN_BLOCK_SIZE:
        return K_MIN_BLOCK_SIZE
    if divisions is not None and divisions > 1 and size > K_MIN_BLOCK_SIZE * divisions:
        return _roundup_power2_next_division(size, divisions)
    return -(-size // K_MIN_BLOCK_SIZE) * K_MIN_BLOCK_SIZE


def get_allocation_size(size: int, large_segment_size: int = K_LARGE_BUFFER) -> int:
    """DeviceCachingAllocator::get_allocation_size: the cudaMalloc size for a rounded request no cached block fits.

    >>> [get_allocation_size(s) // MIB for s in (512, 1 * MIB, 1 * MIB + 512, 10 * MIB, 11 * MIB)]
    [2, 2, 20, 10, 12]
    """
    if size <= K_SMALL_SIZE:
        return K_SMALL_BUFFER
    if size < K_MIN_LARGE_ALLOC:
        return large_segment_size
    return -(-size // K_ROUND_LARGE) * K_ROUND_LARGE


class _Stat:
    """c10's Stat: a current value and its peak (increase_stat / decrease_stat / reset_peak_stat)."""

    __slots__ = ("current", "peak")

    def __init__(self) -> None:
        self.current = self.peak = 0

    def add(self, amount: int) -> None:
        self.current += amount
        if self.current > self.peak:
            self.peak = self.current


class _Segment:
    """One cudaMalloc (``page`` 0) or one expandable segment's reserved address range."""

    __slots__ = ("base", "size", "page")

    def __init__(self, base: int, size: int, page: int) -> None:
        self.base, self.size, self.page = base, size, page


class _Block:
    """struct Block: a piece of a segment, free or allocated, in address order through prev/next."""

    __slots__ = ("ptr", "size", "requested", "stream", "small", "allocated", "mapped",
                 "prev", "next", "segment", "gc_base")  # fmt: skip

    def __init__(self, ptr: int, size: int, stream: int, small: bool, segment: _Segment, mapped: bool = True):
        self.ptr, self.size, self.stream, self.small, self.segment = ptr, size, stream, small, segment
        self.requested, self.allocated, self.mapped, self.gc_base = 0, False, mapped, 0
        self.prev: _Block | None = None
        self.next: _Block | None = None

    def is_split(self) -> bool:
        return self.prev is not None or self.next is not None

    def splice(self, before: _Block | None, after: _Block | None) -> None:
        """Block::splice: put this block between ``before`` and ``after``."""
        if before is not None:
            before.next = self
        if after is not None:
            after.prev = self
        self.prev, self.next = before, after


class _Sorted:
    """A std::set of blocks: the free ones by (size, ptr) (BlockComparatorSize), unmapped ones by ptr."""

    def __init__(self, by_size: bool) -> None:
        self.by_size = by_size
        self.keys: list[tuple[int, int]] = []
        self.blocks: dict[tuple[int, int], _Block] = {}

    def add(self, b: _Block) -> None:
        key = (b.size, b.ptr) if self.by_size else (b.ptr, 0)
        insort(self.keys, key)
        self.blocks[key] = b

    def remove(self, b: _Block) -> None:
        key = (b.size, b.ptr) if self.by_size else (b.ptr, 0)
        del self.keys[bisect_left(self.keys, key)]
        del self.blocks[key]

    def at(self, i: int) -> _Block:
        return self.blocks[self.keys[i]]


class _Pool:
    """struct BlockPool: the small or the large pool; free and unmapped blocks are kept per stream."""

    def __init__(self, small: bool) -> None:
        self.small = small
        self.free: dict[int, _Sorted] = {}
        self.unmapped: dict[int, _Sorted] = {}
        self.gc_calls = 0  # get_free_blocks_call_count

    def free_of(self, stream: int) -> _Sorted:
        free = self.free.get(stream)
        if free is None:
            free = self.free[stream] = _Sorted(by_size=True)
        return free

    def unmapped_of(self, stream: int) -> _Sorted:
        unmapped = self.unmapped.get(stream)
        if unmapped is None:
            unmapped = self.unmapped[stream] = _Sorted(by_size=False)
        return unmapped

    def insert(self, b: _Block) -> None:
        """BlockPool::insert_into_blocks: a free block enters the pool, its gc age restarting."""
        b.gc_base = self.gc_calls
        self.free_of(b.stream).add(b)


@dataclass(frozen=True)
class AllocatorStats:
    """torch.cuda.memory_stats' figures the model keeps (aggregate over pools), in bytes or counts."""

    allocated: int  # memory_allocated: sum of allocated blocks' (rounded, maybe unsplit) sizes
    max_allocated: int  # max_memory_allocated
    reserved: int  # memory_reserved: cudaMalloc'd segments plus mapped expandable pages
    max_reserved: int  # max_memory_reserved
    requested: int  # requested_bytes.all.current: the callers' own sizes
    max_requested: int
    segments: int  # segment.all.current: cudaMalloc segments (torch does not count expandable ones here)
    max_segments: int
    expandable_segments: int  # live expandable segments (address ranges)
    num_alloc_retries: int
    num_ooms: int
    num_device_alloc: int  # cudaMalloc and map calls
    num_device_free: int  # cudaFree and unmap calls


class CachingAllocatorModel:
    """One device's DeviceCachingAllocator, replayed in pure Python.

    >>> model = CachingAllocatorModel()
    >>> a = model.malloc(5 * MIB); b = model.malloc(5 * MIB); model.free(a)
    >>> model.stats().reserved // MIB, model.stats().allocated // MIB, model.stats().max_allocated // MIB
    (20, 5, 10)
    """

    def __init__(self, config: AllocatorConfig | None = None) -> None:
        self.config = config or AllocatorConfig()
        self._split_limit = self.config.split_limit
        # garbage collection runs only under a memory fraction (set_fraction) with a threshold above 0
        self._gc = self.config.memory_fraction is not None and bool(self.config.garbage_collection_threshold)
        self._pools = {True: _Pool(small=True), False: _Pool(small=False)}
        self._active: dict[int, _Block | None] = {}
        self._handles = 0
        self._next_address = 1 << 40
        self._allocated, self._reserved, self._requested, self._segments = _Stat(), _Stat(), _Stat(), _Stat()
        self._expandable = 0
        self.num_alloc_retries = self.num_ooms = self.num_device_alloc = self.num_device_free = 0

    # -- public API ---------------------------------------------------------------------------------------

    def malloc(self, size: int, stream: int = 0) -> int:
        """DeviceCachingAllocator::malloc: allocate ``size`` bytes on ``stream``; returns a handle for free.

        Raises:
            AllocatorOutOfMemory: the request fails even after freeing the cache (torch's OutOfMemoryError).
        """
        if size < 0:
            raise ValueError(f"malloc size {size!r}: must be >= 0")
        self._handles += 1
        if size == 0:  # NativeCachingAllocator::allocate: no malloc for 0 bytes, a null DataPtr
            self._active[self._handles] = None
            return self._handles
        cfg = self.config
        rounded = round_size(size, cfg.roundup_power2_divisions)
        pool = self._pools[rounded <= K_SMALL_SIZE]  # get_pool
        alloc_size = get_allocation_size(rounded, cfg.large_segment_size)
        block = self._get_free_block(pool, rounded, stream)
        if block is None:
            if self._gc:
                self._garbage_collect()
            block = self._alloc_with_retries(pool, rounded, alloc_size, stream)
        if block is None:
            self.num_ooms += 1
            raise AllocatorOutOfMemory(
                f"CUDA out of memory: tried to allocate {alloc_size / MIB:.2f} MiB with {self._reserved.current}"
                f" bytes reserved of a capacity of {cfg.capacity}; give the replay more memory or fewer bytes"
            )
        self._active[self._handles] = self._alloc_found_block(block, rounded, size, self._should_split(block, rounded))
        return self._handles

    def free(self, handle: int) -> None:
        """DeviceCachingAllocator::free: return a block to its pool, merging it with free neighbours."""
        if handle not in self._active:
            raise ValueError(f"free of handle {handle!r}: not allocated (already freed, or never malloc'd)")
        block = self._active.pop(handle)
        if block is None:
            return
        block.allocated = False
        self._allocated.add(-block.size)  # the block's size, as malloc counted it
        self._free_block(block)

    def empty_cache(self) -> None:
        """DeviceCachingAllocator::emptyCache (torch.cuda.empty_cache): release_cached_blocks."""
        self._release_cached_blocks()

    def reset_peak_stats(self) -> None:
        """torch.cuda.reset_peak_memory_stats: every peak restarts from the current value."""
        for stat in (self._allocated, self._reserved, self._requested, self._segments):
            stat.peak = stat.current

    def stats(self) -> AllocatorStats:
        """The figures torch.cuda.memory_stats() would report now."""
        a, r, q, s = self._allocated, self._reserved, self._requested, self._segments
        return AllocatorStats(
            a.current, a.peak, r.current, r.peak, q.current, q.peak, s.current, s.peak, self._expandable,
            self.num_alloc_retries, self.num_ooms, self.num_device_alloc, self.num_device_free,
        )  # fmt: skip

    def snapshot(self) -> list[list[tuple[int, bool]]]:
        """Like torch.cuda.memory_snapshot(): each segment (each mapped run of an expandable one) in address
        order, as its blocks' ``(size, allocated)``."""
        blocks = [b for b in self._active.values() if b is not None]
        for pool in self._pools.values():
            blocks += [b for free in pool.free.values() for b in free.blocks.values()]
        runs: list[list[tuple[int, bool]]] = []
        previous: _Block | None = None
        for block in sorted(blocks, key=lambda b: b.ptr):
            if previous is None or block.prev is not previous:
                runs.append([])
            runs[-1].append((block.size, block.allocated))
            previous = block
        return runs

    # -- finding, splitting and freeing blocks -----------------------------------------------------------------

    def _get_free_block(self, pool: _Pool, size: int, stream: int) -> _Block | None:
        """get_free_block: the smallest free block >= size on the stream, within the oversize limits."""
        if self._gc:
            pool.gc_calls += 1  # block reuse interval is only tracked with garbage collection on
        free = pool.free_of(stream)
        i = bisect_left(free.keys, (size, -1))
        if i == len(free.keys):
            return None
        if free.at(i).segment.page and self.config.expandable_segments:
            # count a block before unmapped space as the size it can grow to; prefer the next block up
            # while that one can grow less
            grow = lambda b: b.size + (b.next.size if b.next is not None and not b.next.mapped else 0)
            while free.at(i).segment.page and i + 1 < len(free.keys) and grow(free.at(i + 1)) < grow(free.at(i)):
                i += 1
        block, limit = free.at(i), self._split_limit
        if size < limit <= block.size:  # do not return an oversized block for a large request
            return None
        if size >= limit and block.size >= size + self.config.max_non_split_rounding_size:
            return None  # an oversized block may be rounded up, but within a limit
        free.remove(block)
        return block

    def _should_split(self, block: _Block, size: int) -> bool:
        """should_split: small pool (and expandable) keep any rest >= 512 B; large, a rest > 1 MiB."""
        remaining = block.size - size
        if block.small or self.config.expandable_segments:
            return remaining >= K_MIN_BLOCK_SIZE
        return size < self._split_limit and remaining > K_SMALL_SIZE

    def _alloc_found_block(self, block: _Block, size: int, requested: int, split: bool) -> _Block:
        """alloc_found_block: cut ``size`` bytes off the front of the block; the rest stays free."""
        if split:
            remaining = block
            block = _Block(remaining.ptr, size, remaining.stream, remaining.small, remaining.segment)
            block.splice(remaining.prev, remaining)
            remaining.ptr += size
            remaining.size -= size
            self._pools[remaining.small].insert(remaining)
        block.allocated, block.requested = True, requested
        self._allocated.add(block.size)  # allocated_bytes counts the block's size, not the request
        self._requested.add(requested)
        return block

    def _free_block(self, block: _Block) -> None:
        """free_block: merge with free neighbours (try_merge_blocks) and return to the pool."""
        self._requested.add(-block.requested)
        for neighbour in (block.prev, block.next):
            self._try_merge(block, neighbour)
        self._pools[block.small].insert(block)

    def _try_merge(self, dst: _Block, src: _Block | None) -> int:
        """try_merge_blocks: absorb a free neighbour in the same mapped state; the bytes absorbed."""
        if src is None or src.allocated or dst.mapped != src.mapped:
            return 0
        pool = self._pools[src.small]
        (pool.free_of(src.stream) if src.mapped else pool.unmapped_of(src.stream)).remove(src)
        if dst.prev is src:
            dst.ptr = src.ptr
            dst.splice(src.prev, dst.next)
        else:
            dst.splice(dst.prev, src.next)
        dst.size += src.size
        return src.size

    # -- getting and returning device memory --------------------------------------------------------------------

    def _new_segment(self, size: int, page: int) -> _Segment:
        align = page or K_ROUND_LARGE
        base = -(-self._next_address // align) * align
        self._next_address = base + size  # later segments sit at higher addresses (see the module docstring)
        return _Segment(base, size, page)

    def _device_has(self, nbytes: int) -> bool:
        cap = self.config.capacity
        return cap is None or self._reserved.current + nbytes <= cap

    def _alloc_block(self, pool: _Pool, size: int, alloc_size: int, stream: int, retry: bool = False) -> _Block | None:
        """alloc_block: a new segment from cudaMalloc (or more pages of an expandable segment)."""
        if retry:
            self.num_alloc_retries += 1
        cfg = self.config
        allowed = cfg.memory_fraction * cfg.capacity if cfg.memory_fraction and cfg.capacity else None
        if allowed is not None and self._reserved.current + alloc_size > allowed:
            return None  # set_fraction: above allowed_memory_maximum
        if cfg.expandable_segments:
            return self._try_allocate_expandable_block(pool, size, stream)
        if not self._device_has(alloc_size):
            return None  # cudaMalloc fails
        self._reserved.add(alloc_size)
        self._segments.add(1)
        self.num_device_alloc += 1
        segment = self._new_segment(alloc_size, 0)
        return _Block(segment.base, alloc_size, stream, pool.small, segment)

    def _alloc_with_retries(self, pool: _Pool, size: int, alloc_size: int, stream: int) -> _Block | None:
        """malloc's fallbacks: alloc_block; else free oversize blocks and retry; else free the cache and retry."""
        block = self._alloc_block(pool, size, alloc_size, stream)
        if block is None and self._release_available_cached_blocks(pool, size, stream):
            block = self._alloc_block(pool, size, alloc_size, stream)
        if block is None and self._release_cached_blocks():
            block = self._alloc_block(pool, size, alloc_size, stream, retry=True)
        return block

    def _release_block(self, block: _Block) -> None:
        """release_block: cudaFree a whole free segment."""
        self._pools[block.small].free_of(block.stream).remove(block)
        self._reserved.add(-block.size)
        self._segments.add(-1)
        self.num_device_free += 1

    def _release_available_cached_blocks(self, pool: _Pool, size: int, stream: int) -> bool:
        """release_available_cached_blocks: with max_split_size set, free oversize blocks to fit ``size``."""
        if self.config.max_split_size is None:
            return False
        target = max(size, self.config.max_split_size)
        free = pool.free_of(stream)
        i = bisect_left(free.keys, (target, -1))
        if i < len(free.keys):
            if free.at(i).segment.page:
                return False  # release_block cannot free expandable memory (it asserts)
            self._release_block(free.at(i))
            return True
        released, j = 0, i - 1  # no single block is large enough: free oversize blocks, the largest first
        while released < target and j >= 0 and free.at(j).size >= self._split_limit:
            if free.at(j).segment.page:
                return False
            released += free.at(j).size
            self._release_block(free.at(j))
            j -= 1
        return released >= target

    def _release_cached_blocks(self) -> bool:
        """release_cached_blocks / release_blocks: free every unsplit free segment, unmap free pages."""
        for small in (False, True):
            pool = self._pools[small]
            blocks = [f.at(i) for _, f in sorted(pool.free.items()) for i in range(len(f.keys))]
            for block in blocks:
                if block.segment.page:
                    self._unmap_block(block)
                    if not block.is_split() and not block.mapped:  # all unmapped: release_expandable_segment
                        pool.unmapped_of(block.stream).remove(block)
                        self._expandable -= 1
                elif not block.is_split():
                    self._release_block(block)
        return True

    def _garbage_collect(self) -> None:
        """garbage_collect_cached_blocks: above the threshold, free unsplit large blocks of above-mean age."""
        cfg = self.config
        assert cfg.garbage_collection_threshold is not None
        assert cfg.memory_fraction
        assert cfg.capacity
        threshold = int(cfg.garbage_collection_threshold * int(cfg.memory_fraction * cfg.capacity))
        if self._reserved.current <= threshold:
            return
        target, reclaimed = self._reserved.current - threshold, 0
        pool = self._pools[False]
        candidates = [f.at(i) for _, f in sorted(pool.free.items()) for i in range(len(f.keys))]
        candidates = [b for b in candidates if not b.is_split() and not b.segment.page]
        total_age = sum(pool.gc_calls - b.gc_base for b in candidates)
        freed = True
        while reclaimed < target and freed and candidates:
            mean_age, freed, kept = total_age / len(candidates), False, []
            for block in candidates:
                age = pool.gc_calls - block.gc_base
                if age >= mean_age:
                    freed, reclaimed, total_age = True, reclaimed + block.size, total_age - age
                    self._release_block(block)
                else:
                    kept.append(block)
            candidates = kept

    # -- expandable segments --------------------------------------------------------------------------------------

    def _find_expandable_block(self, pool: _Pool, size: int, stream: int) -> _Block:
        """find_expandable_block: the lowest free-or-unmapped run with room for ``size``, or a new segment."""
        unmapped = pool.unmapped_of(stream)
        for i in range(len(unmapped.keys)):
            c, prev = unmapped.at(i), unmapped.at(i).prev
            if prev is not None and not prev.allocated:
                c = prev  # a free block right before the unmapped space can be part of the run
            room = 0
            b: _Block | None = c
            while room < size and b is not None and not b.allocated:
                room, b = room + b.size, b.next
            if room >= size:
                return c
        page = K_SMALL_BUFFER if pool.small else self.config.large_segment_size
        total = self.config.capacity or 2**48  # address space for 1 1/8 of the device's memory
        segment = self._new_segment(-(-(total + total // 8) // page) * page, page)
        self._expandable += 1
        candidate = _Block(segment.base, segment.size, stream, pool.small, segment, mapped=False)
        unmapped.add(candidate)
        return candidate

    def _map_block(self, to_map: _Block, size: int) -> bool:
        """map_block / ExpandableSegment::map: back the first ``size`` bytes with whole pages, all or none."""
        seg = to_map.segment
        begin = (to_map.ptr - seg.base) // seg.page
        end = -(-(to_map.ptr + size - seg.base) // seg.page)
        mapped = (end - begin) * seg.page
        if not self._device_has(mapped):
            return False  # cuMemCreate fails; the pages of this call are released again
        pool = self._pools[to_map.small]
        pool.unmapped_of(to_map.stream).remove(to_map)
        to_map.mapped = True
        if mapped < to_map.size:
            rest = _Block(to_map.ptr + mapped, to_map.size - mapped, to_map.stream, to_map.small, seg, mapped=False)
            rest.splice(to_map, to_map.next)
            pool.unmapped_of(to_map.stream).add(rest)
            to_map.size = mapped
        self._try_merge(to_map, to_map.prev)
        self._try_merge(to_map, to_map.next)
        pool.insert(to_map)
        self._reserved.add(mapped)
        self.num_device_alloc += 1
        return True

    def _try_allocate_expandable_block(self, pool: _Pool, size: int, stream: int) -> _Block | None:
        """try_allocate_expandable_block: map pages until a free block of ``size`` bytes exists."""
        candidate = self._find_expandable_block(pool, size, stream)
        if not candidate.mapped and not self._map_block(candidate, min(candidate.size, size)):
            return None
        while candidate.size < size:
            following = candidate.next
            assert following is not None
            if not self._map_block(following, min(size - candidate.size, following.size)):
                return None  # pages mapped by earlier calls stay mapped (and free)
            candidate = following  # it has absorbed the candidate
        pool.free_of(stream).remove(candidate)
        return candidate

    def _unmap_block(self, block: _Block) -> None:
        """unmap_block / ExpandableSegment::unmap: give back the whole pages inside a free block."""
        seg = block.segment
        begin = -(-(block.ptr - seg.base) // seg.page)
        end = (block.ptr + block.size - seg.base) // seg.page
        if begin >= end:
            return
        pool = self._pools[block.small]
        pool.free_of(block.stream).remove(block)
        start, length = seg.base + begin * seg.page, (end - begin) * seg.page
        if start > block.ptr:
            before = _Block(block.ptr, start - block.ptr, block.stream, block.small, seg)
            before.splice(block.prev, block)
            pool.insert(before)
        if block.ptr + block.size > start + length:
            after = _Block(start + length, block.ptr + block.size - start - length, block.stream, block.small, seg)
            after.splice(block, block.next)
            pool.insert(after)
        block.ptr, block.size, block.mapped = start, length, False
        self._try_merge(block, block.prev)
        self._try_merge(block, block.next)
        pool.unmapped_of(block.stream).add(block)
        self._reserved.add(-length)
        self.num_device_free += 1


Event = Sequence[object]


def replay(events: Iterable[Event], config: AllocatorConfig | None = None) -> AllocatorStats:
    """Replay a traced sequence and return the allocator's figures at its end (peaks included).

    Events are ``("alloc", id, size)`` or ``("alloc", id, size, stream)``, ``("free", id)`` and
    ``("empty_cache",)``; ``id`` names a tensor of the trace.

    >>> s = replay([("alloc", "x", 1), ("alloc", "y", 12 * MIB), ("free", "y")])
    >>> s.allocated, s.max_allocated // MIB, s.reserved // MIB, s.segments
    (512, 12, 14, 2)
    """
    model = CachingAllocatorModel(config)
    handles: dict[object, int] = {}
    for event in events:
        kind = event[0]
        if kind == "alloc":
            if event[1] in handles:
                raise ValueError(f"alloc of {event[1]!r}: already allocated and not freed")
            size, stream = event[2], event[3] if len(event) > 3 else 0
            assert isinstance(size, int), event
            assert isinstance(stream, int), event
            handles[event[1]] = model.malloc(size, stream)
        elif kind == "free":
            if event[1] not in handles:
                raise ValueError(f"free of {event[1]!r}: not allocated")
            model.free(handles.pop(event[1]))
        elif kind == "empty_cache":
            model.empty_cache()
        else:
            raise ValueError(f"event {event!r}: expected 'alloc', 'free' or 'empty_cache'")
    return model.stats()
