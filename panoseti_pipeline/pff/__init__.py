"""The PANOSETI File Format (PFF): names, frame index, exact reading, time, writing.

This package is the one place that knows PFF (see PFF_FORMAT.md). A data file is frames
back to back, no file header, no index::

    frame  := header "\\n\\n" "*" pixels
    header := ASCII JSON written by fixed printf formats (fixed width, space padded)
    pixels := little-endian, row-major, size fixed by the data product

Contract, one module per part:

* :mod:`.names`: the file name says the data product, module and seqno; the ``.pffd``
  directory name says the observation run. Bad names are refused with the reason.
* :mod:`.streams`: which files make one stream and in what order (seqno, whatever their
  ``start_``: the DAQ names each rolled-over file with the rollover time).
* :mod:`.products`: each data product's pixels and header; the byte template of a
  header as the DAQ's printf writes it.
* :mod:`.index`: :func:`index_file` finds every frame's byte offset in one streamed pass
  (a longer header is walked, never searched for inside pixels; a corrupt frame is
  skipped and recorded, or refused with ``strict``; a NUL tail is dropped and counted);
  :func:`assume_regular` skips the pass for the usual clean file and is verified while
  reading.
* :mod:`.headers`: every header field decoded in bulk from its fixed-width columns, and
  refused unless it is exactly what printf writes.
* :mod:`.reader`: :func:`read_frames` and :class:`PFFReader` read a frame range with one
  ``readinto`` into a reused buffer: images and every header field, exactly.
* :mod:`.timing`: :func:`frame_times` turns header fields into int64 nanoseconds and the
  quality flags of :mod:`panoseti_pipeline.flags`.
* :mod:`.writer`: :func:`write_frames` writes frames byte-exact to the DAQ's printf formats.
* :mod:`.info`: ``pff.py info``, what is in PFF files.

The names below are the reader API: ``from panoseti_pipeline import pff`` then
``pff.read_frames``, or ``import pff`` from the repository's top.
"""

from __future__ import annotations

from panoseti_pipeline.flags import (
    FLAG_AFTER_GAP,
    FLAG_HOST_CLOCK,
    FLAG_INVALID_NSEC,
    FLAG_INVALID_TIME,
    FLAG_MISSING_QUABO,
    FLAG_NAMES,
    FLAG_OUT_OF_ORDER,
    flag_counts,
)
from panoseti_pipeline.pff.index import (
    DEFAULT_BLOCK_BYTES,
    FrameIndex,
    SkippedRange,
    StrideMismatch,
    assume_regular,
    index_file,
)
from panoseti_pipeline.pff.info import format_ns, main, summarize_file
from panoseti_pipeline.pff.names import (
    HOUSEKEEPING_NAME,
    PFFName,
    RunName,
    is_housekeeping,
    missing_seqnos,
    parse_name,
    parse_run_dir,
    parse_start,
    run_of,
)
from panoseti_pipeline.pff.products import (
    FIELD_DTYPE,
    FIELD_MAX,
    FIELD_WIDTH,
    MODULE_FIELDS,
    N_QUABOS,
    PH256_FIELDS,
    PRODUCTS,
    HeaderLayout,
    Product,
    get_product,
)
from panoseti_pipeline.pff.reader import Frames, PFFReader, copy_pixels, read_frames
from panoseti_pipeline.pff.streams import Stream, group_streams
from panoseti_pipeline.pff.timing import (
    MAX_TV_SEC,
    NAT,
    NSEC_CLAMPED,
    TIME_HOST_CLOCK,
    TIME_WHITE_RABBIT,
    decide_time_source,
    frame_times,
    last_valid_time,
    wr_consistent_fraction,
)
from panoseti_pipeline.pff.writer import encode_frames, write_frames

__all__ = [
    # names
    "HOUSEKEEPING_NAME", "PFFName", "RunName", "is_housekeeping", "missing_seqnos",
    "Stream", "group_streams",
    "parse_name", "parse_run_dir", "parse_start", "run_of",
    # products
    "FIELD_DTYPE", "FIELD_MAX", "FIELD_WIDTH", "MODULE_FIELDS", "N_QUABOS", "PH256_FIELDS",
    "PRODUCTS", "HeaderLayout", "Product", "get_product",
    # index
    "DEFAULT_BLOCK_BYTES", "FrameIndex", "SkippedRange", "StrideMismatch", "assume_regular",
    "index_file",
    # reader
    "Frames", "PFFReader", "copy_pixels", "read_frames",
    # timing and flags
    "MAX_TV_SEC", "NAT", "NSEC_CLAMPED", "TIME_HOST_CLOCK", "TIME_WHITE_RABBIT",
    "decide_time_source", "frame_times", "last_valid_time", "wr_consistent_fraction",
    "FLAG_AFTER_GAP", "FLAG_HOST_CLOCK", "FLAG_INVALID_NSEC", "FLAG_INVALID_TIME",
    "FLAG_MISSING_QUABO", "FLAG_NAMES", "FLAG_OUT_OF_ORDER", "flag_counts",
    # writer
    "encode_frames", "write_frames",
    # info
    "format_ns", "main", "summarize_file",
]
