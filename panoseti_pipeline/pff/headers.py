"""Decoding PFF frame headers exactly as the DAQ's printf wrote them (PFF_FORMAT.md §2-3).

Headers of the nominal length are decoded a whole block at a time: the fixed-width ASCII
columns of every number are gathered with one fancy index and turned into integers with
numpy (:func:`parse_fixed`), after checking every other byte against the header template.
Only the frames that fail (a longer header, a missing quabo line, a damaged byte) fall
back to ``json.loads`` and must then re-print byte for byte through
:func:`~.products.format_header` (:func:`parse_header`): a lost or flipped byte is
refused, never read as a plausible, wrong number.

Notes
-----
* A value is never wrapped into its dtype: above :data:`~.products.FIELD_MAX` is an error.
* printf never writes a leading zero, so ``0000028`` in a number is damage, not 28.
"""

from __future__ import annotations

import json

import numpy as np

from panoseti_pipeline.errors import PFFFormatError
from panoseti_pipeline.pff.products import (
    FIELD_MAX,
    FIELD_WIDTH,
    MODULE_FIELDS,
    N_QUABOS,
    PH256_FIELDS,
    Product,
    format_header,
)


def parse_fixed(hdr: np.ndarray, product: Product) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Parse nominal-length headers (n, header_bytes) column-wise; return values, ok mask.

    A frame is ok when its non-number bytes equal the template and every number is
    right-aligned digits padded with spaces (a digit last), within its field's range.
    """
    layout = product.layout
    n = len(hdr)
    ok = ~layout.static_mismatch(hdr)
    chars = hdr[:, layout.digit_cols]
    out = {}
    for f in product.fields:
        a, b = layout.spans[f]
        c = chars[:, a:b].reshape(n, layout.n_quabos, FIELD_WIDTH[f])
        digit = c - np.uint8(0x30)
        is_digit = digit <= 9
        is_space = c == 0x20
        # only digits and spaces; no space after a digit; the last character a digit;
        # no leading zero (printf never writes one, so "0000028" is a corrupted number)
        ok &= (is_digit | is_space).all(axis=(1, 2)) & is_digit[:, :, -1].all(axis=1)
        ok &= ~(is_digit[:, :, :-1] & is_space[:, :, 1:]).any(axis=(1, 2))
        leading_zero = c[:, :, :-1] == 0x30
        leading_zero[:, :, 1:] &= is_space[:, :, :-2]
        ok &= ~leading_zero.any(axis=(1, 2))
        digit *= is_digit
        values = digit[:, :, 0].astype(np.int64)
        for j in range(1, FIELD_WIDTH[f]):
            values *= 10
            values += digit[:, :, j]
        ok &= (values <= FIELD_MAX[f]).all(axis=1)
        out[f] = values if product.header_kind == "module" else values[:, 0]
    return out, ok


def header_values(path: str, offset: int, header: object, product: Product
                  ) -> dict[str, list[int] | int]:
    """Validate one JSON-decoded header; return field -> value (per quabo for modules)."""
    legacy = {"acq_mode", "mod_num", "pkt_utc"}

    def fail(why: str) -> PFFFormatError:
        return PFFFormatError(f"{path}: bad {product.dp} frame header at byte {offset}: {why}")

    def fields_of(d: object) -> dict[str, int]:
        if not isinstance(d, dict):
            raise fail("expected a JSON object")
        if legacy & d.keys():
            raise PFFFormatError(f"{path}: legacy PFF header at byte {offset} (keys "
                                 f"{sorted(legacy & d.keys())}; files written before "
                                 "2022-10-17 are not supported)")
        want = PH256_FIELDS if product.header_kind == "ph256" else MODULE_FIELDS
        if list(d) != list(want):
            raise fail(f"keys {list(d)}, expected {list(want)}")
        for k, v in d.items():
            if type(v) is not int or not 0 <= v <= FIELD_MAX[k]:
                raise fail(f"{k} = {v!r} is not an integer in 0..{FIELD_MAX[k]}")
        return d

    if product.header_kind == "ph256":
        return fields_of(header)
    if not isinstance(header, dict):
        raise fail("expected a JSON object")
    if legacy & header.keys():
        fields_of(header)
    quabos = [f"quabo_{q}" for q in range(N_QUABOS)]
    present = [k for k in quabos if k in header]
    if not present or list(header) != present:
        raise fail(f"keys {list(header)}, expected {quabos} (a missing quabo's line may be "
                   "left out)")
    per_q = [fields_of(header[k]) if k in header else dict.fromkeys(MODULE_FIELDS, 0)
             for k in quabos]
    return {f: [d[f] for d in per_q] for f in MODULE_FIELDS}


def parse_header(path: str, offset: int, text: bytes, product: Product
                 ) -> dict[str, list[int] | int]:
    """Field values of one header, which must be exactly what the DAQ's printf writes.

    Valid JSON with other padding (a lost or inserted byte) would otherwise read as
    plausible, wrong numbers. A quabo whose line is left out reads as all zeros.
    """
    try:
        header = json.loads(text)
    except ValueError:
        raise PFFFormatError(f"{path}: bad {product.dp} frame header at byte {offset}: "
                             "not valid JSON") from None
    values = header_values(path, offset, header, product)
    quabos = [q for q in range(N_QUABOS) if f"quabo_{q}" in header]
    if format_header(product.header_kind, values, quabos).encode() != text:
        raise PFFFormatError(f"{path}: bad {product.dp} frame header at byte {offset}: "
                             "not in the DAQ's fixed-width format")
    return values


def parse_json_rows(path: str, rows: np.ndarray, offsets: np.ndarray, hlen: int,
                    product: Product, into: dict[str, np.ndarray], at: np.ndarray) -> None:
    """Slow path for the few frames the column parser rejects: :func:`parse_header` each."""
    for i, row, off in zip(at, rows, offsets, strict=True):
        values = parse_header(path, int(off), row[:hlen].tobytes(), product)
        for field, value in values.items():
            into[field][i] = value
