"""Step 2's run: check the L0, compute the baseline, write, verify and publish the L1 store.

:func:`subtract_baseline` is the step: the L1 store is created under a temporary name
with every array defined and the baseline written (:func:`create_l1`); each apply task
(:func:`apply_task`) owns one chunk-aligned frame range and writes its L1 chunks itself;
:func:`verify_l1` checks the result before it is renamed into place.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from panoseti_pipeline import chunking, pff, runners
from panoseti_pipeline.errors import InputError, StoreError
from panoseti_pipeline.look import Look
from panoseti_pipeline.pff.timing import NAT
from panoseti_pipeline.step2 import quality
from panoseti_pipeline.step2.l0_input import QUADRANT, L0Info, arrays_of, inspect_l0
from panoseti_pipeline.step2.methods import (
    ANALYSIS,
    Baseline,
    MethodSettings,
    Subtraction,
    compute_baseline,
    exchange_quadrants,
    formula,
    subtraction_for,
)
from panoseti_pipeline.store import analysis_spec, layout, publish, spec
from panoseti_pipeline.store.shards import ChunkCodec, FrameWriter
from panoseti_pipeline.time_order import (
    QC_RULES,
    cadence_ns,
    read_times,
    time_order,
    timestamp_qc,
)

ZARR_CONCURRENCY = 4  # zarr async I/O concurrency per process


@dataclasses.dataclass(frozen=True)
class L1Layout:
    """How the L1 store's per-frame arrays are cut and encoded (sent with every task)."""

    chunk: int
    per_shard: int
    codec: ChunkCodec
    keep_mantissa_bits: int
    encode_threads: int  # threads reading, subtracting and compressing a task's chunks
    image_name: str = "images"  # the calibrated frames (their name in the team's layout)

    def prepare(self) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
        """The images through BitRound when fewer than 23 mantissa bits are kept."""
        if self.keep_mantissa_bits >= 23:
            return {}
        from numcodecs import BitRound

        rounding = BitRound(keepbits=self.keep_mantissa_bits)
        return {self.image_name: lambda x: rounding.encode(np.ascontiguousarray(x))
                .view(np.float32).reshape(x.shape)}

    def image_filters(self) -> list:
        """The zarr filter that says so in the metadata (BitRound, lossy), or none."""
        if self.keep_mantissa_bits >= 23:
            return []
        from zarr.codecs.numcodecs import BitRound

        return [BitRound(keepbits=self.keep_mantissa_bits)]


def read_l0(info: L0Info, rows: np.ndarray) -> dict[str, np.ndarray]:
    """L0 frames at positions ``rows`` (in that order): images, the carried and derived
    per-frame arrays, and ``l0_frame`` (the positions)."""
    arrays = {n: info.array(n) for n in ["images", *info.carried]}
    frames = layout.read_rows(arrays, rows, arrays["images"].chunks[0])
    return frames | info.derive(frames) | {"l0_frame": rows}


def l1_chunk(info: L0Info, sub: Subtraction, a: int, rows: np.ndarray, image_name: str
             ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """L1 frames a..a+len(rows)-1, made of the L0 frames ``rows`` (residuals and the
    per-frame arrays), and their partial summary."""
    frames = read_l0(info, rows)
    x = frames.pop("images")
    quabo = frames["quabo_num"] if info.ph256 else None
    missing = None if info.ph256 else quality.missing_quabos(frames)
    out = sub.residuals(x, quabo, runners.thread_array("f32", x.shape, np.float32), missing)
    nan = nan_counts(info, sub, out, quabo, missing)
    look = Look.empty("", layout.LEVEL_L1, info.dp, str(info.module), info.n_frames)
    look.add(a, out, frames["frame_flags"], frames["time"], quabo,  # while in memory
             nan_free=not any(nan.values()))
    summary = quality.chunk_summary(a, out, frames["frame_flags"], frames["time"], nan)
    return {image_name: out, **frames}, summary | {"look": look}


def nan_counts(info: L0Info, sub: Subtraction, out: np.ndarray, quabo: np.ndarray | None,
               missing: np.ndarray | None) -> dict[str, int]:
    """NaN values of a chunk by cause: a missing quabo's quadrant, a pixel with no baseline
    (in frames where its quabo is there), and (ph_pedestal) not above the cut."""
    no_base = np.isnan(sub.baseline).reshape(info.groups, -1)
    if info.ph256:  # frames of each quabo x its pixels without a baseline
        frames_of = np.bincount(quabo.astype(np.intp), minlength=info.groups)
        uncalibrated = int(frames_of @ no_base.sum(axis=1))
        gone = 0
    else:
        quadrant = QUADRANT[: info.shape[0], : info.shape[1]].ravel()
        per_quadrant = np.bincount(quadrant[no_base[0]], minlength=pff.N_QUABOS)
        uncalibrated = int((~missing).sum(axis=0) @ per_quadrant)
        gone = int(missing.sum()) * (info.pixels // pff.N_QUABOS)
    below = 0  # only ph_pedestal's cut makes NaN that must be counted
    if sub.threshold is not None:
        below = int(np.count_nonzero(np.isnan(out))) - gone - uncalibrated
    return {"missing_quabo": gone, "uncalibrated": uncalibrated, "below_threshold": below}


def apply_task(info: L0Info, sub: Subtraction, l1_path: str, start: int, stop: int,
               rows: np.ndarray | None, l1: L1Layout, process: runners.ProcessSettings
               ) -> dict[str, Any]:
    """Write L1 frames start..stop-1: images and every per-frame array, whole shards.

    ``rows``: the L0 positions of those frames (time order); None: start..stop-1. The
    per-frame arrays are read from the L0 chunk by chunk and written with the L1's
    chunks and codecs (an L0 of another writer may chunk and compress them otherwise).
    """
    if rows is None:
        rows = np.arange(start, stop, dtype=np.int64)
    runners.prepare_process(process)
    arrays = l1_arrays(info, l1.image_name)
    writer = FrameWriter(l1_path, {a.name: a.dtype for a in arrays},
                         {a.name: 1 + len(a.trailing) for a in arrays}, l1.chunk,
                         l1.per_shard, info.n_frames, start, l1.codec, l1.encode_threads,
                         l1.prepare())
    try:
        for a in range(start, stop, l1.chunk):
            writer.add(functools.partial(l1_chunk, info, sub, a,
                                         rows[a - start: min(stop, a + l1.chunk) - start],
                                         l1.image_name))
        parts = writer.close()
    except BaseException:
        writer.abort()  # nothing of this task is written after the driver's cleanup
        raise
    look = functools.reduce(Look.merge, [p.pop("look") for p in parts])  # in frame order
    return {"start": start, "frames": stop - start, "parts": parts, "look": look}


L0_FRAME_ATTRS = {"long_name": "position of the frame in the L0 store (acquisition order)",
                  "comment": "the L1 is in time order; argsort(l0_frame) gives back the "
                             "L0's order"}


def l1_arrays(info: L0Info, image_name: str) -> list[spec.FrameArray]:
    """The L1's per-frame arrays: PANOSETI's layout with float32 images (NaN fill) named
    ``image_name``, and ``l0_frame``."""
    images, *per_frame = spec.frame_arrays(info.product, info.module)
    images = dataclasses.replace(images, name=image_name, dtype=np.dtype("<f4"),
                                 fill_value=float("nan"))
    return [images, *per_frame,
            spec.FrameArray("l0_frame", np.dtype("<i8"), (), ("time",), L0_FRAME_ATTRS, -1)]


NAN_MEANS = ("no measurement: the pixel's quabo is missing in that frame (frame_flags bit "
             "1, its quabo_<q>_tv_sec is 0), or the pixel has no baseline")


def create_l1(path: Path, info: L0Info, m: MethodSettings, baseline: Baseline,
              l1: L1Layout) -> None:
    """The L1 group with every array defined and the baseline written."""
    import zarr

    codecs = layout.compressors(l1.codec)
    group = zarr.open_group(store=str(path), mode="w-")
    images, *per_frame = l1_arrays(info, l1.image_name)
    images = dataclasses.replace(images, attrs={
        **images.attrs, "long_name": f"baseline-subtracted {info.dp} pixels",
        "units": m.units, "formula": formula(info, m),
        "nan_means": NAN_MEANS + (f" or not above the cut ({m.method})"
                                  if m.like == "ph_pedestal" else "")})
    layout.create_frame_arrays(group, [images, *per_frame], info.n_frames, l1.chunk,
                               l1.per_shard, codecs, l1.image_filters())
    dims = ("quabo", "y", "x") if info.ph256 else ("y", "x")
    std_name = "standard deviation (ddof 0) of the frames that made the baseline"
    in_l1_order = exchange_quadrants if m.exchange else (lambda a: a)  # like the images
    for name, values, long_name in (
            ("baseline", baseline.values, f"baseline ({m.method}"
             + (f", a multiple of {m.quantum:g} ADC counts" if m.quantum else "") + ")"),
            ("baseline_std", baseline.std, f"pedestal noise: {std_name}")):
        data = in_l1_order((values if info.ph256 else values[0]).astype(np.float32))
        array = layout.create_array(group, name, data.shape, data.shape, "<f4", dims, codecs,
                                    {"_ARRAY_DIMENSIONS": list(dims), "long_name": long_name,
                                     "units": "ADC counts"}, fill_value=float("nan"))
        array[...] = data
    for name, (mask, mask_dims, attrs) in stored_masks(baseline, info, m).items():
        array = layout.create_array(group, name, mask.shape, mask.shape, "u1", mask_dims,
                                    codecs, {"_ARRAY_DIMENSIONS": list(mask_dims), **attrs})
        array[...] = in_l1_order(mask.copy())


#: panoseti_analysis stores its own masks under the usual names, the pipeline's under these
PIPELINE_MASK_NAMES = {"hot_pixel_mask": "pipeline_hot_pixel_mask",
                       "dead_pixel_mask": "pipeline_dead_pixel_mask"}
ANALYSIS_MASK_ATTRS = {
    "hot_pixel_mask": {"long_name": "hot pixels (1 = hot), the PANOSETI analysis code's rule",
                       "rule": "hot: level > 3 * mean(level) over the pixels; level: pulse "
                               "heights, the pedestal + baseline_offset; images, the "
                               "upsampled block-median map"},
    "dead_pixel_mask": {"long_name": "dead pixels (1 = dead), the PANOSETI analysis code's "
                                     "rule", "rule": "dead: level == 0 (level as for hot)"},
}


def stored_masks(baseline: Baseline, info: L0Info, m: MethodSettings
                 ) -> dict[str, tuple[np.ndarray, tuple[str, ...], dict[str, Any]]]:
    """The L1's uint8 masks by name: (values in the L0's pixel order, dims, attributes).

    The pipeline's (:func:`quality.pixel_masks`, shaped like the stored baseline) are
    ``hot_pixel_mask`` and ``dead_pixel_mask``, unless the method has its own
    (panoseti_analysis, (y, x)): those take the names, the pipeline's are kept beside.
    """
    hot, dead = quality.pixel_masks(baseline.values, baseline.std, m.adc_to_pe)
    ours = (hot, dead) if info.ph256 else (hot[0], dead[0])
    dims = ("quabo", "y", "x") if info.ph256 else ("y", "x")
    attrs = {name: quality.MASK_ATTRS[name] for name in quality.MASK_ATTRS}
    attrs["hot_pixel_mask"] = {**attrs["hot_pixel_mask"], "adc_per_pe": m.adc_to_pe}
    if baseline.own_masks is None:
        return {name: (mask, dims, attrs[name]) for name, mask in zip(attrs, ours, strict=True)}
    return ({name: (mask, ("y", "x"), ANALYSIS_MASK_ATTRS[name])
             for name, mask in zip(ANALYSIS_MASK_ATTRS, baseline.own_masks, strict=True)}
            | {PIPELINE_MASK_NAMES[name]: (mask, dims, attrs[name])
               for name, mask in zip(attrs, ours, strict=True)})


def verify_l1(path: Path, info: L0Info, sub: Subtraction, summaries: list[dict],
              l1_layout: L1Layout, order: np.ndarray) -> None:
    """Every frame written, every chunk present, first and last chunk read back right
    (``order``: the L0 position of every L1 frame)."""
    import zarr

    got = sum(s["frames"] for s in summaries)
    if got != info.n_frames:
        raise StoreError(f"{path}: wrote {got} frames, the L0 store has {info.n_frames}")
    l1 = arrays_of(zarr.open_group(store=str(path), mode="r", use_consolidated=False))
    for name, array in l1.items():
        missing, expected = layout.missing_files(path, array)
        if missing:
            raise StoreError(f"{path}: {name} has {missing} of {expected} chunk files "
                             "missing after writing")
    n = info.n_frames
    for a, b in {(0, min(n, 64)), (max(0, n - 64), n)}:
        x = read_l0(info, order[a:b])
        quabo = x["quabo_num"] if info.ph256 else None
        missing = None if info.ph256 else quality.missing_quabos(x)
        expect = sub.residuals(x.pop("images"), quabo, missing=missing)
        name = l1_layout.image_name
        stored = layout.read_frames({k: l1[k] for k in [name, *x]}, a, b)
        same_images = np.allclose(stored.pop(name), expect, equal_nan=True, atol=0,
                                  rtol=2.0 ** -l1_layout.keep_mantissa_bits)
        same_frames = all(np.array_equal(stored[k], v) for k, v in x.items())
        if not (same_images and same_frames):
            raise StoreError(f"{path}: frames {a}..{b - 1} read back differ from the "
                             "L0 input and the baseline")


def analysis_attributes(info: L0Info, m: MethodSettings, l0_path: Path,
                        l0_attrs: dict[str, Any], l1_path: Path, started: str
                        ) -> dict[str, Any]:
    """The root attributes of PANOSETI's analysis storage spec (``l1_layout =
    "panoseti_analysis"``): ``data_level``, its version key, their ``calibration`` record
    and a ``processing_history`` of step 1 (from the L0's attributes) and step 2, with
    the data checksums of the L0 and of this L1 (written but for its attributes)."""
    calibration = (m.parameters() if m.method == ANALYSIS
                   else {"kind": info.kind, "method": m.method, **m.parameters()})
    l0_sum = analysis_spec.data_checksum(l0_path)
    convert = analysis_spec.processing_step(
        "convert", (l0_attrs.get("config") or {}).get("pff_to_zarr", {}),
        list(l0_attrs.get("source_checksums", [])), l0_sum, l0_attrs.get("created", ""),
        l0_attrs.get("software") or {})
    calibrate = analysis_spec.processing_step(
        f"calibrate_{info.kind}" if m.method == ANALYSIS else "baseline_subtract",
        calibration, [l0_sum], analysis_spec.data_checksum(l1_path), started,
        layout.software_versions())
    return {"data_level": layout.LEVEL_L1,
            analysis_spec.STORAGE_VERSION_KEY: analysis_spec.STORAGE_VERSION,
            "calibration": calibration, "processing_history": [convert, calibrate]}


def _check_paths(l0_path: Path, l1_path: Path) -> None:
    a, b = l0_path.resolve(), l1_path.resolve()
    if a == b or a.is_relative_to(b) or b.is_relative_to(a):
        raise InputError(f"{l1_path}: the L1 output must not be, contain or sit inside "
                         f"the L0 input {l0_path}")


@dataclasses.dataclass(frozen=True)
class Result:
    """What one run did, for the summary line and the driver's table."""

    output: str
    status: str  # "ok" or "exists"
    method: str = ""
    frames: int = 0
    seconds: float = 0.0
    l0_bytes: int = 0
    l1_bytes: int = 0
    mode: str = ""

    def line(self) -> str:
        if self.status == "exists":
            return f"{self.output}: complete L1 store exists, left alone (--overwrite replaces it)"
        ratio = self.l1_bytes / max(self.l0_bytes, 1)
        return (f"{self.output}: L1 written ({self.method} baseline, {self.frames} frames, "
                f"{self.seconds:.1f} s, {self.mode}; {self.l1_bytes / 1e6:.1f} MB = "
                f"{ratio:.2f}x the L0 size)")


def subtract_baseline(l0_path: str | os.PathLike, l1_path: str | os.PathLike, cfg: Any, *,
                      client: Any = None, overwrite: bool = False, quiet: bool = False,
                      notice: Callable[[str], None] | None = None,
                      threads: int | None = None) -> Result:
    """L0 store -> L1 store with the configured baseline method; published atomically.

    ``client``: a Dask client whose workers run the tasks (None: threads of this process).
    An existing complete L1 store is left alone unless ``overwrite``.
    """
    import zarr

    notice = notice or (lambda msg: print(msg, file=sys.stderr))
    section = cfg.baseline_subtract  # read here only: what the layers below use is taken out
    l0_path, output = Path(l0_path), Path(l1_path)
    _check_paths(l0_path, output)
    gw = cfg.run.group_writable
    process = runners.ProcessSettings(ZARR_CONCURRENCY, 0, 0, gw)  # compression: all CPUs
    runners.prepare_process(process)
    if not overwrite and publish.is_published(output, layout.LEVEL_L1):
        return Result(str(output), "exists")
    t0, started = time.perf_counter(), publish.utc_now()
    team = section.l1_layout == "panoseti_analysis"
    info = inspect_l0(l0_path)
    m = MethodSettings.of(section, info)
    l0 = layout.open_product(l0_path, layout.LEVEL_L0)
    times = read_times(l0["unix_t_ns"], m.chunk)
    qc = timestamp_qc(times, info.kind, cadence_ns(info.kind, l0.attrs.get("run_configs")),
                      sorted_copy=True)
    if qc["status"] == "suspect" and section.fail_on_suspect:
        raise InputError(f"{l0_path}: unix_t_ns is suspect: a backward jump of more than "
                         f"{'1000 cadences' if info.kind == 'img' else '1 s'} (timestamp "
                         "corruption?); [baseline_subtract] fail_on_suspect = false writes "
                         "the L1 anyway")
    order = time_order(times)
    in_order = bool((order == np.arange(order.size)).all())
    untimed = int(np.count_nonzero(times == NAT))
    del times
    for message in publish.clear_stale(output):
        notice(message)
    publish.apply_permission_policy(gw)
    runner = runners.runner_for(client, threads, not quiet)
    baseline = compute_baseline(runner, l0, info, m, order, process)
    if baseline.frames.get("window_truncated"):
        notice(f"{l0_path}: baseline_window = {section.baseline_window} is more than the "
               "frames there are; the baseline uses all of them")
    check = baseline.frames.get("window_check") or {}
    warnings = [check["warning"]] if check.get("warning") else []
    for line in warnings:
        notice(f"{l0_path}: warning: {line}")
    for q in baseline.frames["per_quabo"]:
        if q["count"] == 0 and not info.ph256:  # a ph256 quabo with no frame has no pixels
            notice(f"{l0_path}: no frame of quabo {q['quabo']} feeds its baseline; its "
                   "L1 pixels are NaN")
    sub = subtraction_for(m, baseline)
    l1 = L1Layout(chunking.time_chunk(section.compute_chunk_size, info.n_frames),
                  section.shard_factor,
                  ChunkCodec(section.codec, section.level, section.shuffle, section.checksum),
                  section.keep_mantissa_bits, runners.cpus(),
                  analysis_spec.main_array(info.kind) if team else "images")
    with publish.publishing(output, layout.LEVEL_L1, overwrite) as tmp:
        create_l1(tmp, info, m, baseline, l1)
        calls = [(info, sub, str(tmp), a, b, None if in_order else order[a:b], l1, process)
                 for a, b in chunking.task_ranges(info.n_frames, l1.chunk, l1.per_shard or 1)]
        summaries: list[dict] = []
        runner.map(apply_task, calls, f"{output.name}", lambda _i, r: summaries.append(r))
        verify_l1(tmp, info, sub, summaries, l1, order)
        masks = stored_masks(baseline, info, m)
        summary = quality.combine_summaries(
            [p for s in summaries for p in s["parts"]], units=m.units,
            hot=int(masks["hot_pixel_mask"][0].sum()),
            dead=int(masks["dead_pixel_mask"][0].sum()),
            uncalibrated_pixels=int(np.isnan(baseline.values).sum()), warnings=warnings)
        l0_bytes, l1_bytes = publish.store_bytes(l0_path), publish.store_bytes(tmp)
        seconds = time.perf_counter() - t0
        group = zarr.open_group(store=str(tmp), mode="r+", use_consolidated=False)
        functools.reduce(Look.merge, [s["look"] for s in sorted(
            summaries, key=lambda s: s["start"])]).save(group)  # what the quicklook shows
        ours = {
            **{k: l0.attrs[k] for k in spec.REQUIRED_ATTRIBUTES if k in l0.attrs},
            **({"shard_factor": l1.per_shard} if l1.per_shard else {}),
            "processing_level": layout.LEVEL_L1,
            "calibration": {"method": m.method,
                            "parameters": m.parameters() | baseline.extra},
            "frame_flags_source": ("L0" if not info.derived else
                                   "derived in step 2: missing_quabo only; the other flags "
                                   "are unknown (the L0 had no frame_flags)"),
            "time_source": l0.attrs.get("time_source"),
            "timestamp_qc": qc,
            "time_order": {"sorted_by": "unix_t_ns (stable; frames without a time last, "
                                        "flagged in the L0 as missing_quabo or invalid_time)",
                           "reordered": not in_order, "l0_frame": "each frame's L0 position",
                           "frames_without_time": untimed, "timestamp_qc_rules": QC_RULES},
            "flag_counts": l0.attrs.get("flag_counts"),
            "baseline_method": m.method,
            "baseline_window": m.window,
            "parameters": m.parameters() | baseline.extra,
            "baseline_frames": baseline.frames,
            "formula": formula(info, m),
            "precision": {"keep_mantissa_bits": section.keep_mantissa_bits,
                          "lossy": section.keep_mantissa_bits < 23,
                          "baseline_quantum": m.quantum,
                          "max_baseline_error": m.quantum / 2},
            "config": cfg.as_dict(),
            "l0_path": str(l0_path.resolve()),
            "l0": l0.attrs.asdict(),
            "software": layout.software_versions(),
            "created": publish.utc_now(),
            "size": {"l0_bytes": l0_bytes, "l1_bytes": l1_bytes,
                     "l1_to_l0_ratio": round(l1_bytes / max(l0_bytes, 1), 4)},
            "report": {"seconds": round(seconds, 3), "mode": runner.mode,
                       "tasks": len(calls), "time_chunk": l1.chunk,
                       "nan_values": summary["nan_values"]["total"]},
            "summary": summary,
        }
        group.attrs.update(ours | (analysis_attributes(info, m, l0_path, l0.attrs.asdict(),
                                                       tmp, started) if team else {}))
        layout.consolidate(tmp)
    return Result(str(output), "ok", m.method, info.n_frames, seconds, l0_bytes,
                  l1_bytes, runner.mode)
