"""Memory records of one rank, for ``ftprof sweep --memory_snapshot``: where the peak comes from.

- On CUDA, the caching allocator's history (:func:`torch.cuda.memory._record_memory_history`), recorded from
  before the model is built until after the profiled step and dumped as ``<stem>.pickle``: every segment and
  block the allocator holds at the end, and the last :data:`MAX_ENTRIES` allocations and frees with their
  Python stacks. Open it in https://pytorch.org/memory_viz (Active Memory Timeline, Allocator State History).
- On every device (CPU included), one training step under :class:`torch.profiler.profile`
  (``profile_memory``, ``record_shapes``, ``with_stack``) and its memory timeline by category:
  ``<stem>-timeline.html`` (a stacked plot to open in a browser) and ``<stem>-timeline.json``
  (``[timestamps_us, sizes]``, each row of ``sizes`` a 0 then the bytes of parameters, optimizer state, inputs,
  temporaries, activations, gradients, autograd detail and unknown, torch's plot order). Where torch's memory
  profiler fails on a step's op graph (seen on a second gloo rank on CPU), the step's Chrome trace, which
  carries its memory events, is written as ``<stem>-trace.json`` instead (https://ui.perfetto.dev).

Which step is profiled is the caller's choice (:class:`~ftprof.profiler.ProfilerCallback` profiles the step
after its measured window). What could not be written is said in :attr:`MemoryRecorder.notes`, one line
each; a failed export leaves no partial file behind.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any

import torch

MAX_ENTRIES = 100_000  # allocator events kept (a ring buffer: the latest ones); a few KB each in the pickle


class MemoryRecorder:
    """Write one rank's memory records into ``folder`` as ``<stem>.pickle`` and ``<stem>-timeline.*``.

    Call :meth:`start` before the model is built (or moved to the GPU), :meth:`begin_step` /
    :meth:`end_step` around the one step to profile, and :meth:`finish` after the last step; :attr:`files`
    then lists what was written and :attr:`notes` what was not, and why.
    """

    def __init__(self, folder: Path, stem: str, cuda: bool | None = None, max_entries: int = MAX_ENTRIES) -> None:
        self.folder = Path(folder)
        self.stem = stem
        self.cuda = torch.cuda.is_available() if cuda is None else cuda
        self.max_entries = max_entries
        self.files: list[Path] = []
        self.notes: list[str] = []  # what failed at run time (without CUDA there is simply no .pickle)
        self._recording = False
        self._profiler: Any = None
        self._stepped = False

    def start(self) -> None:
        """Start the allocator's history (CUDA; nothing elsewhere)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if not self.cuda:
            return
        try:
            # Python stacks only: C++ frames cost more per allocation and make the file several times larger.
            torch.cuda.memory._record_memory_history(
                enabled="all", context="all", stacks="python", max_entries=self.max_entries
            )
            self._recording = True
        except Exception as err:  # noqa: BLE001  (a build without the allocator's history: say so, go on)
            self.notes.append(f"no allocator snapshot: recording its history failed ({_one_line(err)})")

    def begin_step(self) -> None:
        """Start the profiler around the step about to run."""
        from torch.profiler import profile

        self._stepped = True
        try:
            self._profiler = profile(profile_memory=True, record_shapes=True, with_stack=True)
            self._profiler.start()
        except Exception as err:  # noqa: BLE001
            self._profiler = None
            self.notes.append(f"no memory timeline: the profiler did not start ({_one_line(err)})")

    def end_step(self) -> None:
        """Stop the profiler and write the step's memory timeline (HTML plot and JSON data)."""
        profiler, self._profiler = self._profiler, None
        if profiler is None:
            return
        device = f"cuda:{torch.cuda.current_device()}" if self.cuda else "cpu"
        try:
            profiler.stop()
        except Exception as err:  # noqa: BLE001
            self.notes.append(f"no memory timeline: the profiler did not stop ({_one_line(err)})")
            return
        try:
            with warnings.catch_warnings():  # deprecated for the allocator's history, which is CUDA-only
                warnings.simplefilter("ignore", FutureWarning)
                for suffix in ("-timeline.html", "-timeline.json"):
                    self._write(
                        self.folder / f"{self.stem}{suffix}", lambda p: profiler.export_memory_timeline(str(p), device)
                    )
        except Exception as err:  # noqa: BLE001  (torch's memory profiler can fail on some op graphs)
            note = f"no memory timeline ({device}): {_one_line(err)}"
            try:
                self._write(self.folder / f"{self.stem}-trace.json", lambda p: profiler.export_chrome_trace(str(p)))
                note += f"; wrote the step's trace with its memory events instead ({self.stem}-trace.json)"
            except Exception as trace_err:  # noqa: BLE001
                note += f"; no trace either: {_one_line(trace_err)}"
            self.notes.append(note)

    def finish(self) -> list[Path]:
        """Dump the allocator's snapshot and stop its history (CUDA); return the files written."""
        if self._profiler is not None:  # training ended inside the profiled step
            self.end_step()
        if not self._stepped:
            self.notes.append("no memory timeline: training ended before a step could be profiled")
        if self._recording:
            try:
                self._write(self.folder / f"{self.stem}.pickle", lambda p: torch.cuda.memory._dump_snapshot(str(p)))
            except Exception as err:  # noqa: BLE001
                self.notes.append(f"no allocator snapshot: {_one_line(err)}")
            finally:
                torch.cuda.memory._record_memory_history(enabled=None)
                self._recording = False
        return self.files

    def _write(self, path: Path, write: Any) -> None:
        """Write ``path`` with ``write(path)``; keep it only if it exists and is not empty (torch's HTML export
        returns without a file when matplotlib is missing), and never leave a partial one behind."""
        try:
            write(path)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        if path.is_file() and path.stat().st_size > 0:
            self.files.append(path)
        else:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
            self.notes.append(f"{path.name} was not written (torch produced no file)")


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:120]}" if text else type(err).__name__
