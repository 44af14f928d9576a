"""Step 1: the PFF files of one stream → one lossless L0 Zarr store.

Plan (driver) → tasks (local threads or Dask workers) → verify → publish:

* the driver checks the inputs are one stream, indexes each file (assuming the nominal
  stride and verifying it while reading, pff.PFFReader), decides each file's time
  source and cuts the frames into ranges aligned to ``time_chunk``;
* each task (:func:`convert_range`) reads its byte ranges, decodes pixels, headers,
  times and flags, writes whole chunks straight into the store under a temporary name,
  and returns a small summary — image data never travels back;
* meanwhile the driver imports zarr and creates the arrays' metadata on a thread; then
  it checks the frame count and reads a sample of chunks back against the PFF bytes,
  writes the attributes, consolidates metadata and renames the store into place.

Tasks look back before their range for the last frame with a time, so the out-of-order
flag is the same as a sequential read's wherever the ranges are cut.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from panoseti_pipeline import chunking, pff, run_bundle, runners
from panoseti_pipeline.errors import InputError, PFFNameError, StoreError
from panoseti_pipeline.store import analysis_spec, layout, publish, spec
from panoseti_pipeline.store.shards import ChunkCodec, FrameWriter
from panoseti_pipeline.time_order import cadence_ns, read_times, timestamp_qc

CONTEXT_FRAMES = 8
VERIFY_SAMPLE_CHUNKS = 3


@dataclasses.dataclass(frozen=True)
class SourceFile:
    """One input file of the stream, as the tasks need it (small, picklable)."""

    path: str
    seqno: int
    index: pff.FrameIndex
    first: int  # global frame number of this file's frame 0
    time_source: str

    @property
    def stop(self) -> int:
        return self.first + self.index.n_frames


@dataclasses.dataclass(frozen=True)
class TaskSettings:
    """What a task needs besides its frame range (sent to Dask workers)."""

    store: str
    files: tuple[SourceFile, ...]
    process: runners.ProcessSettings
    chunk: int  # frames per chunk of every array
    per_shard: int  # chunks per shard file; 0: one file per chunk
    codec: ChunkCodec
    encode_threads: int  # threads compressing one task's chunks


# --------------------------------------------------------------------------- inputs


def check_stream(paths: Sequence[str | os.PathLike], notice: Callable[[str], None]
                 ) -> list[pff.PFFName]:
    """The non-empty files of one stream in seqno order (:func:`pff.group_streams`);
    refuse anything else up front."""
    names, problems = [], []
    for p in map(Path, paths):
        try:
            if not p.exists():
                raise InputError(f"{p}: no such file")
            if not p.is_file():
                raise InputError(f"{p}: not a regular file")
            if not os.access(p, os.R_OK):
                raise InputError(f"{p}: not readable (permission denied)")
            names.append(pff.parse_name(p))
        except (InputError, PFFNameError) as err:
            problems.append(str(err))
    if problems:
        raise InputError("\n".join(problems))
    streams, problems = pff.group_streams(names)
    if problems:
        raise InputError("\n".join(problems))
    if len(streams) > 1:
        same_name = len({n.path.name for n in names}) < len(names)  # e.g. copies elsewhere
        listing = "; ".join(f"{n.path if same_name else n.path.name} ({n.dp}, module "
                            f"{n.module})" for n in names)
        raise InputError(f"inputs are not one stream (same directory, dp and module): "
                         f"{listing}")
    stream = streams[0]
    for line in stream.notices:
        notice(line)
    files = stream.data_files
    if not files:
        raise InputError(f"{', '.join(str(n.path) for n in stream.files)}: empty (0 bytes): "
                         "no data to convert (every input file is empty)")
    for n in stream.files:
        if n not in files:
            notice(f"{n.path}: empty (0 bytes), skipped")
    return files


def index_stream(names: Sequence[pff.PFFName], notice: Callable[[str], None], *,
                 exact: bool = False, strict: bool = False) -> list[SourceFile]:
    """Index every file and decide its time source; number frames across the stream.

    ``exact``: index every frame (one pass over the files) instead of assuming the
    nominal frame length and verifying it while reading.
    """
    files, first = [], 0
    for k, name in enumerate(names):
        # strict: a corrupt frame refuses the input; else its bytes are skipped, recorded
        index = pff.index_file(name.path, name.dp, strict=strict) if exact else None
        with pff.PFFReader(name.path, index, strict=strict) as reader:
            source = pff.decide_time_source(reader)
            index = reader.index
        if index.n_frames == 0:
            raise InputError(f"{name.path}: no whole frame ({index.partial_bytes} bytes, a "
                             f"{name.dp} frame is {name.product.frame_bytes})")
        if index.partial_bytes:
            where = "last file" if k == len(names) - 1 else "NOT the last file of the stream"
            notice(f"{name.path}: partial last frame dropped ({index.partial_bytes} bytes; "
                   f"{where})")
        for line in index.damage_notices():
            notice(line)
        files.append(SourceFile(str(name.path), name.seqno, index, first, source))
        first += index.n_frames
    return files


# --------------------------------------------------------------------------- task


def _read_piece(f: SourceFile, a: int, b: int) -> pff.Frames:
    """Global frames a..b-1 (within file ``f``) through this thread's read buffer."""
    nbytes = f.index.byte_range(a - f.first, b - f.first)[1]
    return pff.read_frames(f.path, f.index, a - f.first, b - f.first,
                           buffer=runners.thread_array("read", (nbytes,), np.uint8),
                           copy=False)


def _pieces(files: Sequence[SourceFile], lo: int, hi: int
            ) -> Iterator[tuple[SourceFile, int, int]]:
    """(file, first, stop) global frame ranges of each file overlapping lo..hi-1."""
    for f in files:
        s, e = max(lo, f.first), min(hi, f.stop)
        if s < e:
            yield f, s, e


def previous_time(files: Sequence[SourceFile], a: int) -> int:
    """Time of the last frame before frame ``a`` that has one (NaT at the stream start).

    The out-of-order flag compares with it, so a task's flags equal a sequential read's
    wherever the task boundary falls. Looks back in growing windows: nearly always the
    frame just before has a time.
    """
    span = CONTEXT_FRAMES
    while a > 0:
        lo, last = max(0, a - span), pff.NAT
        for f, s, e in _pieces(files, lo, a):
            t, _ = pff.frame_times(_read_piece(f, s, e).headers, f.time_source)
            last = pff.last_valid_time(t, last)
        if last != pff.NAT or lo == 0:
            return last
        span *= 8
    return pff.NAT


def decode_range(files: Sequence[SourceFile], a: int, b: int
                 ) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray, np.ndarray, int]:
    """Images, headers, time and flags of global frames a..b-1, and the bytes read.

    The images live in this thread's reused buffer: use them before the next call.
    """
    product = files[0].index.product
    n = b - a
    images = runners.thread_array("images", (n, *product.shape), product.dtype)
    headers = {f: np.empty((n, *product.header_shape), pff.FIELD_DTYPE[f])
               for f in product.fields}
    time_ns = np.empty(n, np.int64)
    flags = np.empty(n, np.uint8)
    prev, nbytes = previous_time(files, a), 0
    for f, s, e in _pieces(files, a, b):
        frames = _read_piece(f, s, e)
        out = slice(s - a, e - a)
        time_ns[out], flags[out] = pff.frame_times(frames.headers, f.time_source, prev)
        flags[out] |= frames.index_flags  # after_gap: the first frame after skipped bytes
        prev = pff.last_valid_time(time_ns[out], prev)
        pff.copy_pixels(images[out], frames.images)
        for k, v in frames.headers.items():
            headers[k][out] = v
        nbytes += f.index.byte_range(s - f.first, e - f.first)[1]
    return images, headers, time_ns, flags, nbytes


def frame_values(product: pff.Product, images: np.ndarray, headers: dict[str, np.ndarray],
                 time_ns: np.ndarray, flags: np.ndarray) -> dict[str, np.ndarray]:
    """Decoded frames as the store's arrays (:func:`panoseti_pipeline.store.spec.frame_arrays`)."""
    return {"images": images, "unix_t_ns": time_ns, **spec.header_columns(product, headers),
            "time": time_ns, "frame_flags": flags}


def decode_chunk(files: Sequence[SourceFile], a: int, b: int
                 ) -> tuple[dict[str, np.ndarray], tuple[int, dict[str, int]]]:
    """Frames a..b-1 as the store's arrays, and (bytes read, flag counts)."""
    images, headers, time_ns, flags, nbytes = decode_range(files, a, b)
    values = frame_values(files[0].index.product, images, headers, time_ns, flags)
    return values, (nbytes, pff.flag_counts(flags))


def convert_range(settings: TaskSettings, a: int, b: int) -> dict[str, Any]:
    """Task: decode global frames a..b-1 and write their chunk (or shard) files.

    ``a`` is a shard boundary (a chunk boundary without sharding) and ``b`` the next one
    or the end: the task owns every file it writes. Its chunks are decoded and encoded on
    ``encode_threads`` threads and written in order; returns a small summary.
    """
    runners.prepare_process(settings.process)
    arrays = spec.frame_arrays(settings.files[0].index.product, 0)
    writer = FrameWriter(settings.store, {x.name: x.dtype for x in arrays},
                         {x.name: 1 + len(x.trailing) for x in arrays}, settings.chunk,
                         settings.per_shard, settings.files[-1].stop, a, settings.codec,
                         settings.encode_threads)
    try:
        for c in range(a, b, settings.chunk):
            writer.add(functools.partial(decode_chunk, settings.files, c,
                                         min(b, c + settings.chunk)))
        summaries = writer.close()
    except BaseException:
        writer.abort()  # nothing of this task is written after the driver's cleanup
        raise
    counts = dict.fromkeys(pff.FLAG_NAMES.values(), 0)
    for _, chunk_counts in summaries:
        for name, count in chunk_counts.items():
            counts[name] += count
    return {"start": a, "stop": b, "frames": b - a,
            "bytes_read": sum(nbytes for nbytes, _ in summaries), "flags": counts}


# --------------------------------------------------------------------------- driver


@dataclasses.dataclass
class Result:
    """What step 1 did, for the report line and the run record."""

    output: str
    status: str  # "ok" or "exists"
    frames: int = 0
    seconds: float = 0.0
    input_bytes: int = 0
    store_bytes: int = 0
    report: dict[str, Any] = dataclasses.field(default_factory=dict)

    def line(self) -> str:
        if self.status == "exists":
            return f"{self.output}: complete L0 store already there, left alone"
        r = self.report
        flags = ", ".join(f"{k}={v}" for k, v in r["flag_counts"].items())
        return (f"{self.output}: {self.frames} frames, {r['mb_per_s']:.0f} MB/s, "
                f"compression {r['compression_ratio']:.2f}x, "
                f"dropped {r['partial_bytes_dropped']} bytes, walked {r['frames_walked']} "
                f"frames, time source {r['time_source']}, flags: {flags}"
                + (f"; DEGRADED: {r['skipped_ranges']} corrupt byte range(s) skipped (see "
                   "source_files[].skipped)" if r["degraded"] else ""))


def _create_store(path: Path, files: Sequence[SourceFile], settings: TaskSettings,
                  cfg: Any) -> None:
    """The arrays' metadata (zarr), beside the chunk files the tasks write meanwhile."""
    import zarr

    section = cfg.pff_to_zarr
    layout.configure_zarr(section.max_concurrent_writes, settings.process.compress_threads())
    product = files[0].index.product
    group = zarr.open_group(store=str(path), mode="a")  # holds the tasks' chunk files
    layout.create_frame_arrays(group, spec.frame_arrays(product, _name(files).module),
                               files[-1].stop, settings.chunk, settings.per_shard,
                               layout.compressors(settings.codec))


def _name(files: Sequence[SourceFile]) -> pff.PFFName:
    return pff.parse_name(files[0].path)


def _sample(n: int, time_chunk: int) -> list[tuple[int, int, int]]:
    """The chunks verification reads back: (chunk, first frame, stop) of the first,
    middle and last."""
    n_chunks = -(-n // time_chunk)
    return [(c, c * time_chunk, min(n, (c + 1) * time_chunk))
            for c in sorted({0, n_chunks // 2, n_chunks - 1})[:VERIFY_SAMPLE_CHUNKS]
            if n_chunks]


def _decode_sample(files: Sequence[SourceFile], sample: list[tuple[int, int, int]]
                   ) -> list[dict[str, np.ndarray]]:
    """What the sampled chunks must hold, decoded from the PFF files again."""
    out = []
    for _, a, b in sample:
        values = frame_values(files[0].index.product, *decode_range(files, a, b)[:4])
        values["images"] = values["images"].copy()  # out of this thread's reused buffer
        out.append(values)
    return out


def _verify(path: Path, files: Sequence[SourceFile], summaries: list[dict], n: int,
            sample: list[tuple[int, int, int]],
            expected: Callable[[], list[dict[str, np.ndarray]]]) -> None:
    """Frame count = index count; the sample of chunks read back equals ``expected()``
    (:func:`_decode_sample`, decoded meanwhile on another thread)."""
    import zarr

    got = sum(s["frames"] for s in summaries)
    if got != n:
        raise StoreError(f"{path}: wrote {got} frames, the index has {n}")
    names = [x.name for x in spec.frame_arrays(files[0].index.product, 0)]
    arrays = dict(zarr.open_group(store=str(path), mode="r", use_consolidated=False).arrays())
    stored = layout.read_ranges({name: arrays[name] for name in names},
                                [(a, b) for _, a, b in sample])
    for (c, a, b), back, want in zip(sample, stored, expected(), strict=True):
        if not all(np.array_equal(back[name], want[name]) for name in names):
            raise StoreError(f"{path}: chunk {c} (frames {a}..{b - 1}) read back differs "
                             "from the PFF input")


def _attributes(files: Sequence[SourceFile], summaries: list[dict], cfg: Any,
                report: dict[str, Any], configs: dict[str, Any]) -> dict[str, Any]:
    """The spec's root attributes (PANOSETI's, :mod:`panoseti_pipeline.store.spec`), then
    ours: provenance of every input file, time source, flag counts, config, software;
    ``configs``: the run's JSON configs (:func:`run_bundle.run_configs`)."""
    first = _name(files)
    run = pff.run_of(files[0].path)
    sources = {f.time_source for f in files}
    counts = dict.fromkeys(pff.FLAG_NAMES.values(), 0)
    for s in summaries:
        for k, v in s["flags"].items():
            counts[k] += v
    report["flag_counts"] = counts
    return {
        **spec.spec_attributes(first.product, first.module,
                               [Path(f.path).name for f in files], files[-1].stop, configs,
                               cfg.pff_to_zarr.shard_factor),
        "processing_level": layout.LEVEL_L0,
        "run_start": first.start.isoformat(),
        "observation": run.as_attrs() if run else {},
        "source_files": [{"name": Path(f.path).name, "size": f.index.file_size,
                          "seqno": f.seqno, "frames": f.index.n_frames,
                          "partial_bytes_dropped": f.index.partial_bytes,
                          "frames_walked": f.index.frames_walked,
                          "nul_tail_bytes": f.index.nul_tail_bytes,
                          "skipped": [dataclasses.asdict(s) for s in f.index.skipped],
                          "time_source": f.time_source} for f in files],
        "time_source": sources.pop() if len(sources) == 1 else "mixed",
        "flag_counts": counts,
        "config": cfg.as_dict(),
        "software": layout.software_versions(),
        "created": publish.utc_now(),
        "report": report,
    }


def convert(inputs: Sequence[str | os.PathLike], output: str | os.PathLike, cfg: Any, *,
            client: Any = None, overwrite: bool = False, quiet: bool = False,
            notice: Callable[[str], None] | None = None) -> Result:
    """Convert the PFF files of one stream into the L0 store ``output``.

    Files are first read assuming the nominal frame length (verified at the start,
    middle and end). If a task then meets a frame elsewhere (longer headers that happen
    to add up to whole frames), the stream is indexed frame by frame and converted again.
    """
    notice = notice or (lambda msg: print(msg, file=sys.stderr))
    output = Path(output)
    names = check_stream(inputs, notice)
    if not overwrite and publish.is_published(output, layout.LEVEL_L0):
        return Result(str(output), "exists")
    run = pff.run_of(names[0].path)  # its configs are read before any work, not after it
    configs = run_bundle.run_configs(run.path, notice=notice) if run else {}
    for message in publish.clear_stale(output):
        notice(message)
    publish.apply_permission_policy(cfg.run.group_writable)
    t0 = time.perf_counter()
    strict = cfg.pff_to_zarr.strict
    files = index_stream(names, notice, strict=strict)
    try:
        return _publish(files, output, cfg, client, overwrite, quiet, t0, configs)
    except pff.StrideMismatch as err:
        notice(f"{err}: indexing the stream frame by frame and converting again")
    files = index_stream(names, lambda _msg: None, exact=True, strict=strict)
    return _publish(files, output, cfg, client, overwrite, quiet, t0, configs)


def _publish(files: list[SourceFile], output: Path, cfg: Any, client: Any, overwrite: bool,
             quiet: bool, t0: float, configs: dict[str, Any]) -> Result:
    """Write, verify and publish the L0 store of an indexed stream."""
    section = cfg.pff_to_zarr
    n = files[-1].stop
    chunk = chunking.time_chunk(section.time_chunk, n)
    per_shard = section.shard_factor
    ranges = chunking.task_ranges(n, chunk, per_shard or chunking.chunks_per_task(
        chunk, files[0].index.product.frame_bytes, section.chunk_size_mb))
    # The tasks write chunk files, never through zarr (None). Only the driver needs zarr
    # (0.35 s of imports) and the arrays' metadata: both are made on a thread meanwhile.
    # Local tasks and their threads stay within this process's share of the machine when
    # products run side by side (run.sh's PANOSETI_CPUS).
    share = runners.cpu_share() if client is None else None
    tasks, blosc = ((min(section.num_workers, share), min(section.blosc_threads, share))
                    if share else (0 if client else section.num_workers,
                                   section.blosc_threads))
    process = runners.ProcessSettings(None, blosc, tasks, cfg.run.group_writable)
    # the thread's work ends before the store is published or removed on failure
    with (publish.publishing(output, layout.LEVEL_L0, overwrite) as tmp,
          concurrent.futures.ThreadPoolExecutor(1, "step1-driver") as meanwhile):
        settings = TaskSettings(str(tmp), tuple(files), process, chunk, per_shard,
                                ChunkCodec(section.codec, section.level, section.shuffle,
                                           section.checksum),
                                blosc)
        store_made = meanwhile.submit(_create_store, tmp, files, settings, cfg)
        checksums = (meanwhile.submit(lambda: [analysis_spec.file_checksum(f.path)
                                               for f in files])
                     if cfg.baseline_subtract.l1_layout == "panoseti_analysis" else None)
        if client is None:
            runners.prepare_process(process)
        summaries: list[dict[str, Any]] = []

        def fold(_i: int, summary: dict[str, Any]) -> int:
            summaries.append(summary)
            return summary["frames"]

        runner = runners.runner_for(client, tasks, not quiet)
        # Each task carries the settings (the frame indexes: small). Scattered once
        # instead, they would live on one worker only -- Dask's memory manager drops the
        # other replicas -- and a worker lost with them would cancel every task.
        runner.map(convert_range, [(settings, a, b) for a, b in ranges], str(output), fold,
                   total=n, unit="frame")
        sample = _sample(n, chunk)
        expected = meanwhile.submit(_decode_sample, files, sample)  # while reading back
        store_made.result()
        _verify(tmp, files, summaries, n, sample, expected.result)
        seconds = time.perf_counter() - t0
        input_bytes = sum(f.index.file_size for f in files)
        store_bytes = publish.store_bytes(tmp)
        report = {"frames": n, "seconds": round(seconds, 3),
                  "mb_per_s": input_bytes / 1e6 / max(seconds, 1e-9),
                  "compression_ratio": input_bytes / max(store_bytes, 1),
                  "input_bytes": input_bytes, "store_bytes": store_bytes,
                  "partial_bytes_dropped": sum(f.index.partial_bytes for f in files),
                  "frames_walked": sum(f.index.frames_walked for f in files),
                  "nul_tail_bytes": sum(f.index.nul_tail_bytes for f in files),
                  "skipped_ranges": sum(len(f.index.skipped) for f in files),
                  "degraded": any(f.index.degraded for f in files),
                  "time_source": ", ".join(sorted({f.time_source for f in files})),
                  "tasks": len(ranges), "mode": runner.mode}
        import zarr

        group = zarr.open_group(store=str(tmp), mode="r+", use_consolidated=False)
        group.attrs.update(_attributes(files, summaries, cfg, report, configs))
        if checksums is not None:  # the team's processing history names the inputs
            group.attrs["source_checksums"] = checksums.result()
        kind = _name(files).product.family
        group.attrs["timestamp_qc"] = timestamp_qc(  # recorded, never repaired
            read_times(group["unix_t_ns"], chunk), kind,
            cadence_ns(kind, configs), sorted_copy=False)
        layout.consolidate(tmp)
    return Result(str(output), "ok", n, seconds, input_bytes, store_bytes, report)
