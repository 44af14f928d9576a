"""Writing PFF frames byte for byte as the DAQ writes them (PFF_FORMAT.md §2).

For tests, synthetic observations and benchmarks: a file written here must be
indistinguishable from a recorded one, including the headers that printf widens. Numbers
that fit their minimum width are encoded for all frames at once into the header
template; only the few frames with a wider number are printed one by one.
"""

from __future__ import annotations

from typing import BinaryIO

import numpy as np

from panoseti_pipeline.pff.products import (
    DELIMITER,
    FIELD_MAX,
    FIELD_WIDTH,
    format_header,
    get_product,
)


def _encode_fixed(values: np.ndarray, width: int) -> np.ndarray:
    """Non-negative ints that fit ``width`` -> (n, width) right-aligned ASCII, space padded."""
    v = values.astype(np.int64)[:, None]
    powers = 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)
    digits = (v // powers) % 10 + 0x30
    pad = (v < powers) & (powers > 1)
    return np.where(pad, 0x20, digits).astype(np.uint8)


def encode_frames(dp: str, images: np.ndarray, headers: dict[str, np.ndarray]) -> bytes:
    """Frames as the DAQ writes them, byte for byte (PFF_FORMAT.md §2)."""
    product = get_product(dp)
    images = np.asarray(images)
    n = len(images)
    if images.shape[1:] != product.shape:
        raise ValueError(f"{dp} images must be (n, {product.shape[0]}, {product.shape[1]})")
    values = {f: np.asarray(headers[f], np.int64).reshape(n, *product.header_shape)
              for f in product.fields}
    for f, v in values.items():
        if v.size and (v.min() < 0 or v.max() > FIELD_MAX[f]):
            raise ValueError(f"{f} outside 0..{FIELD_MAX[f]}")
    layout = product.layout
    rows = np.empty((n, product.frame_bytes), np.uint8)
    rows[:, :layout.size] = layout.template
    rows[:, layout.size:layout.size + 3] = np.frombuffer(DELIMITER, np.uint8)
    rows[:, layout.size + 3:] = np.ascontiguousarray(images, product.dtype).reshape(n, -1).view(
        np.uint8)
    wide = np.zeros(n, bool)
    for (f, q), col in layout.columns.items():
        v = values[f] if product.header_kind == "ph256" else values[f][:, q]
        fits = v < 10 ** FIELD_WIDTH[f]
        wide |= ~fits
        rows[:, col:col + FIELD_WIDTH[f]] = _encode_fixed(np.where(fits, v, 0), FIELD_WIDTH[f])
    parts, done = [], 0
    for i in np.flatnonzero(wide):  # only a few frames are ever wider than the minimum
        parts.append(rows[done:i].tobytes())
        vals = {f: values[f][i].tolist() for f in product.fields}
        text = format_header(product.header_kind, vals).encode()
        parts.append(text + DELIMITER + rows[i, layout.size + 3:].tobytes())
        done = i + 1
    parts.append(rows[done:].tobytes())
    return b"".join(parts)


def write_frames(f: BinaryIO, dp: str, images: np.ndarray, headers: dict[str, np.ndarray]
                 ) -> int:
    """Append frames to an open binary file; return the number of bytes written."""
    data = encode_frames(dp, images, headers)
    f.write(data)
    return len(data)
