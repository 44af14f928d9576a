"""``pff.py info FILE_OR_DIR...``: what is in PFF files, one block of lines per file.

    python3 pff.py info run.pffd                  # every .pff file of an observation
    python3 -m panoseti_pipeline pff info FILE.pff
    python3 pff.py info STORE.zarr                # a product store (L0 or L1)

For each data file: product, module, seqno, whole frames, partial bytes dropped, frames
walked, first and last time and the time source, flag counts, and per quabo the gaps in
``pkt_num`` (lost packets); a NUL tail and skipped corrupt byte ranges when there are.
Housekeeping and 0-byte files are named and skipped. For a Zarr store (a directory with a
``zarr.json``): level, product, module, run, frames, time span, flag counts, bytes on disk,
uncompressed bytes and the compression ratio, the L1/L0 size ratio; for a housekeeping
store its records and sources. Exit status 0 when every file was
read, 1 when some failed (one stderr line each, naming the file), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from panoseti_pipeline.errors import (
    InputError,
    PFFFormatError,
    PFFNameError,
    report_each,
    run_main,
)
from panoseti_pipeline.flags import FLAG_NAMES, flag_counts
from panoseti_pipeline.pff.names import PFFName, is_housekeeping, parse_name
from panoseti_pipeline.pff.products import N_QUABOS
from panoseti_pipeline.pff.reader import PFFReader
from panoseti_pipeline.pff.timing import NAT, decide_time_source, frame_times, last_valid_time


def _pkt_gaps(pkt_num: np.ndarray, live: np.ndarray, last: np.ndarray) -> tuple[int, int]:
    """(gaps, missing packets) in one quabo's pkt_num column, mod 65536; updates last."""
    vals = pkt_num[live].astype(np.int64)
    if not vals.size:
        return 0, 0
    seq = np.concatenate((last[:1], vals)) if last[0] >= 0 else vals
    step = np.diff(seq) % 65536
    last[0] = vals[-1]
    jumps = step[step != 1]
    return int(jumps.size), int(np.where(jumps > 1, jumps - 1, 0).sum())


def summarize_file(path: str | os.PathLike, frames_per_block: int = 4096) -> dict:
    """Everything ``pff.py info`` prints about one data file (streams in blocks)."""
    name = parse_name(path)
    with PFFReader(path) as reader:
        return _summarize(name, reader, frames_per_block)


def _summarize(name: PFFName, reader: PFFReader, frames_per_block: int) -> dict:
    source = decide_time_source(reader)
    counts = dict.fromkeys(FLAG_NAMES.values(), 0)
    first = last = NAT
    n_groups = 4 if name.product.header_kind == "ph256" else N_QUABOS
    last_pkt = np.full((n_groups, 1), -1, np.int64)
    gaps = np.zeros((n_groups, 2), np.int64)
    prev = NAT
    for _start, frames in reader.blocks(frames_per_block):
        t, flags = frame_times(frames.headers, source, prev)
        flags |= frames.index_flags
        prev = last_valid_time(t, prev)
        for k, v in flag_counts(flags).items():
            counts[k] += v
        valid = t[t != NAT]
        if valid.size:
            first = int(valid[0]) if first == NAT else first
            last = int(valid[-1])
        h = frames.headers
        for g in range(n_groups):
            if name.product.header_kind == "ph256":
                col, live = h["pkt_num"], (h["quabo_num"] == g) & (h["tv_sec"] != 0)
            else:
                col, live = h["pkt_num"][:, g], h["tv_sec"][:, g] != 0
            gaps[g] += _pkt_gaps(col, live, last_pkt[g])
    index = reader.index
    return {"file": reader.path, "dp": name.dp, "module": name.module, "seqno": name.seqno,
            "frames": index.n_frames, "partial_bytes_dropped": index.partial_bytes,
            "frames_walked": index.frames_walked, "time_source": source,
            "nul_tail_bytes_dropped": index.nul_tail_bytes,
            "skipped": [dataclasses.asdict(r) for r in index.skipped],
            "damage": index.damage_notices(),
            "first_time": format_ns(first), "last_time": format_ns(last),
            "flags": counts,
            "pkt_num_gaps": {f"quabo_{g}": {"gaps": int(gaps[g, 0]), "missing": int(gaps[g, 1])}
                             for g in range(n_groups)}}


def format_ns(t: int) -> str:
    """int64 ns -> ISO 8601 UTC with nanoseconds (``NaT`` for the missing value)."""
    if t == NAT:
        return "NaT"
    return np.datetime_as_string(np.datetime64(t, "ns"), unit="ns") + "Z"


def _info_lines(summary: dict) -> list[str]:
    s = summary
    flags = ", ".join(f"{k}={v}" for k, v in s["flags"].items())
    gaps = ", ".join(f"{q}: {g['gaps']} gaps/{g['missing']} missing"
                     for q, g in s["pkt_num_gaps"].items())
    damage = ([f"  nul_tail_bytes_dropped={s['nul_tail_bytes_dropped']} "
               f"skipped_ranges={len(s['skipped'])}"]
              + [f"  {line}" for line in s["damage"]]) if s["damage"] else []
    return [s["file"],
            f"  dp={s['dp']} module={s['module']} seqno={s['seqno']} frames={s['frames']} "
            f"partial_bytes_dropped={s['partial_bytes_dropped']} "
            f"frames_walked={s['frames_walked']}",
            *damage,
            f"  time {s['first_time']} .. {s['last_time']} (source: {s['time_source']})",
            f"  flags: {flags}",
            f"  pkt_num: {gaps}"]


def _expand(paths: Sequence[str]) -> Iterator[Path]:
    for p in map(Path, paths):
        yield from sorted(p.glob("*.pff")) if p.is_dir() and not _is_store(p) else [p]


def _is_store(path: Path) -> bool:
    return path.suffix == ".zarr" or (path / "zarr.json").is_file()


def _store_lines(path: Path) -> list[str]:
    """What ``pff.py info`` prints about a Zarr store (product or housekeeping)."""
    from panoseti_pipeline.housekeeping import is_hashset_root
    from panoseti_pipeline.store.facts import read_root, store_facts

    attrs = read_root(path)[1].get("attributes") or {}
    if is_hashset_root(attrs):  # the team's layout
        cadence = attrs.get("cadence_ns")
        return [str(path), f"  housekeeping, hashset {attrs['hashset']}: {attrs.get('records')}"
                f" records of {len(attrs.get('sources', []))} source(s) "
                f"({', '.join(attrs.get('sources', []))}), one every "
                + (f"{cadence / 1e9:.3g} s" if cadence else "- s")]
    if attrs.get("content") == "housekeeping":
        sources = attrs.get("records_by_source", {})
        return [str(path), f"  housekeeping: {attrs.get('records')} records, "
                f"{len(sources)} sources ({', '.join(sources)}), cut last record "
                f"{attrs.get('cut_last_record')}, unreadable {attrs.get('unreadable_records')}"]
    f = store_facts(path)
    flags = ", ".join(f"{k}={v}" for k, v in f.flag_counts.items())
    ratio = f"{f.compression_ratio:.2f}" if f.compression_ratio else "-"
    return [str(path),
            f"  level={f.level} dp={f.data_product} module={f.module} frames={f.frames}"
            f" run={f.run or '-'} site={f.site or '-'}",
            f"  time {format_ns(NAT if f.first_ns is None else f.first_ns)} .. "
            f"{format_ns(NAT if f.last_ns is None else f.last_ns)}",
            f"  flags: {flags or '-'}",
            f"  size: {f.bytes} bytes on disk, {f.raw_bytes} uncompressed "
            f"(compression ratio {ratio})"
            + (f", PFF/L0 {f.pff_to_l0:.2f}" if f.pff_to_l0 else "")
            + (f", L1/L0 {f.l1_to_l0:.2f}" if f.l1_to_l0 else "")]


def main(argv: Sequence[str] | None = None, prog: str = "pff.py") -> int:
    """``pff.py info FILE_OR_DIR_OR_STORE...``: what is in PFF files and Zarr stores."""
    from panoseti_pipeline.version import add_version_option

    parser = argparse.ArgumentParser(prog=prog, description=main.__doc__)
    add_version_option(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="summarise PFF files (a .pffd directory: its files) "
                          "or Zarr stores")
    info.add_argument("paths", nargs="+", metavar="FILE_OR_DIR")
    info.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)

    def body() -> int:
        return report_each(_expand(args.paths), _print_info, "pff.py", args.debug,
                           (InputError, PFFFormatError, PFFNameError))

    return run_main(body, "pff.py", args.debug)


def _print_info(path: Path) -> None:
    """What ``pff.py info`` says about one path: a PFF file, a store, or why neither."""
    if is_housekeeping(path):
        print(f"{path}\n  housekeeping (hk.pff): not image data, skipped")
    elif not path.exists():
        raise InputError(f"{path}: no such file")
    elif _is_store(path):
        print("\n".join(_store_lines(path)))
    elif path.stat().st_size == 0:
        print(f"{path}\n  empty (0 bytes): no frames")
    else:
        print("\n".join(_info_lines(summarize_file(path))))


if __name__ == "__main__":
    sys.exit(main())
