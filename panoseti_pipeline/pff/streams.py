"""Streams: which PFF files belong together, and in what order (PFF_FORMAT.md §6).

The DAQ writes each (data product, module) of a run into numbered files: when a file
passes its size limit it starts the next ``seqno``, naming it with the time of the
rollover (``new_dp_file()`` sets ``start_time = time(NULL)``). So a stream is the files of
one run directory with the same dp, module (and any other name keys), whatever their
``start_``, joined in seqno order. What a real DAQ would not write -- a ``start_`` that
goes backwards as seqno grows, a seqno missing in between -- is told in a notice, not
refused; the same seqno twice cannot be ordered and is refused.

This is the one home of that rule: ``run.sh``'s plan and step 1 both call
:func:`group_streams`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path

from panoseti_pipeline.pff.names import PFFName, missing_seqnos


@dataclasses.dataclass(frozen=True)
class Stream:
    """The files of one stream in seqno order, empty (0-byte) ones included."""

    directory: Path
    dp: str
    module: int
    files: tuple[PFFName, ...]
    sizes: tuple[int, ...]
    notices: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"{self.directory}: dp_{self.dp} module_{self.module}"

    @property
    def data_files(self) -> list[PFFName]:
        """The files that hold data (the DAQ creates every product's file at start, so
        0-byte files are normal)."""
        return [n for n, size in zip(self.files, self.sizes, strict=True) if size]


def stream_key(name: PFFName) -> tuple:
    """What the files of one stream share: run directory, dp, module, other name keys."""
    return (str(name.path.parent.resolve()), name.dp, name.module,
            tuple(sorted(name.extra.items())))


def group_streams(names: Iterable[PFFName]) -> tuple[list[Stream], list[str]]:
    """Streams (sorted by directory, dp, module) and the problems that refuse a stream."""
    groups: dict[tuple, list[PFFName]] = {}
    for name in names:
        groups.setdefault(stream_key(name), []).append(name)
    streams, problems = [], []
    for key in sorted(groups):
        files = sorted(groups[key], key=lambda n: n.seqno)
        first = files[0]
        label = f"{first.path.parent}: dp_{first.dp} module_{first.module}"
        seqnos = [n.seqno for n in files]
        twice = sorted({s for s in seqnos if seqnos.count(s) > 1})
        if twice:
            problems.append(f"{label}: duplicate seqno {twice} ("
                            + ", ".join(str(n.path) for n in files if n.seqno in twice)
                            + "); the files cannot be ordered")
            continue
        notices = []
        missing = missing_seqnos(files)
        if missing:
            notices.append(f"{label}: seqno {', '.join(map(str, missing))} missing; "
                           "joined without it")
        for before, after in zip(files, files[1:], strict=False):
            if after.start < before.start:
                notices.append(
                    f"{label}: seqno {after.seqno} is named start_{after.start:%H:%M:%SZ}, "
                    f"before seqno {before.seqno} (start_{before.start:%H:%M:%SZ}); the DAQ "
                    "names each file with its rollover time, so a clock step or a renamed "
                    "file? joined in seqno order")
        sizes = tuple(n.path.stat().st_size for n in files)
        streams.append(Stream(first.path.parent, first.dp, first.module, tuple(files), sizes,
                              tuple(notices)))
    return streams, problems
