"""PFF data products and the byte layout of their frames (PFF_FORMAT.md §2).

The data product (``dp`` in the file name) fixes the pixels (type, shape) and the header
before them: a module header (four quabo sub-headers) or a ph256 header (one quabo). A
frame is that header, :data:`DELIMITER`, then the pixels. :func:`format_header` is the
DAQ's printf; :class:`HeaderLayout` is the byte template it writes for values that fit
their minimum widths, which the vectorised parser checks every header against.

Notes
-----
* Every width in :data:`FIELD_WIDTH` is a printf *minimum*: ``pkt_nsec`` is a 32-bit board
  value printed with ``%9u``, so values ``>= 10**9`` widen the header by up to a byte per
  quabo. Only the nominal (all-fit) header has the fixed length ``header_bytes``.
* A module header may lack the line of a quabo whose packet did not arrive (valid JSON,
  122 bytes shorter per line): read as that quabo's fields all 0, like a zeroed line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from panoseti_pipeline.errors import PFFNameError

MODULE_FIELDS = ("pkt_num", "pkt_tai", "pkt_nsec", "tv_sec", "tv_usec")
PH256_FIELDS = ("quabo_num", *MODULE_FIELDS)
N_QUABOS = 4

#: printf minimum width of each field (PFF_FORMAT.md §2)
FIELD_WIDTH = {"quabo_num": 1, "pkt_num": 10, "pkt_tai": 4, "pkt_nsec": 9, "tv_sec": 10,
               "tv_usec": 6}
#: smallest integer dtype holding every legal value of the field, losslessly
FIELD_DTYPE = {"quabo_num": np.dtype("u1"), "pkt_num": np.dtype("<u2"),
               "pkt_tai": np.dtype("<u2"), "pkt_nsec": np.dtype("<u4"),
               "tv_sec": np.dtype("<i8"), "tv_usec": np.dtype("<u4")}
#: largest legal value of each field (values above are a format error, never wrapped)
FIELD_MAX = {"quabo_num": 3, "pkt_num": 0xFFFF, "pkt_tai": 1023, "pkt_nsec": 0xFFFFFFFF,
             "tv_sec": 9_999_999_999, "tv_usec": 999_999}

#: what ends every header and starts the pixels
DELIMITER = b"\n\n*"

_MODULE_QUABO_FMT = ('   "quabo_{q}": {{ "pkt_num": {pkt_num:10d}, "pkt_tai": {pkt_tai:4d}, '
                     '"pkt_nsec": {pkt_nsec:9d}, "tv_sec": {tv_sec:10d}, '
                     '"tv_usec": {tv_usec:6d}}}')
_PH256_FMT = ('{{ "quabo_num": {quabo_num:1d}, "pkt_num": {pkt_num:10d}, '
              '"pkt_tai": {pkt_tai:4d}, "pkt_nsec": {pkt_nsec:9d}, "tv_sec": {tv_sec:10d}, '
              '"tv_usec": {tv_usec:6d}}}')


def format_header(kind: str, values: dict[str, Sequence[int]] | dict[str, int],
                  quabos: Sequence[int] = tuple(range(N_QUABOS))) -> str:
    """One header exactly as the DAQ's printf writes it (widths are minimums).

    ``quabos``: the module quabos that have a line; some DAQ builds leave out the line
    of a quabo whose packet did not arrive (a shorter header).
    """
    if kind == "ph256":
        return _PH256_FMT.format(**values)
    lines = [_MODULE_QUABO_FMT.format(q=q, **{f: values[f][q] for f in MODULE_FIELDS})
             for q in quabos]
    return "{\n" + ", \n".join(lines) + "\n}"


@dataclasses.dataclass(frozen=True)
class HeaderLayout:
    """Byte template of a nominal header and the plan of its vectorised parser.

    ``digit_cols`` holds the byte columns of every digit of every fixed-width number, so
    one fancy index gathers all of a block's numbers; each field's digits are then
    decoded together with integer Horner steps (no per-frame Python).
    """

    template: np.ndarray  # uint8 (header_bytes,), numbers blanked to spaces
    static: np.ndarray  # bool (header_bytes,): True where the byte is not part of a number
    columns: dict[tuple[str, int], int]  # (field, quabo) -> first byte of the number
    digit_cols: np.ndarray  # int64 (n_digits,): byte columns of every digit, field-major
    spans: dict[str, tuple[int, int]]  # field -> its slice of digit_cols
    n_quabos: int  # numbers per field: 4 (module) or 1 (ph256)
    words: int  # leading whole 32-bit words of the header, compared as words

    @property
    def size(self) -> int:
        return int(self.template.size)

    def static_mismatch(self, hdr: np.ndarray) -> np.ndarray:
        """Frames (n, header_bytes) whose non-number bytes differ from the template."""
        w = self.words * 4
        words = np.ascontiguousarray(hdr[:, :w]).view("<u4") if hdr.strides[0] % 4 else \
            hdr[:, :w].view("<u4")
        tmpl = self.template[:w].view("<u4")
        mask = np.where(self.static[:w], 0xFF, 0).astype(np.uint8).view("<u4")
        bad = ((words ^ tmpl) & mask).any(axis=1)
        tail = self.static[w:]
        return bad | (hdr[:, w:][:, tail] != self.template[w:][tail]).any(axis=1)


def _header_layout(kind: str) -> HeaderLayout:
    fields = PH256_FIELDS if kind == "ph256" else MODULE_FIELDS
    n_q = 1 if kind == "ph256" else N_QUABOS
    zero = format_header(kind, {f: [0] * N_QUABOS if kind == "module" else 0 for f in fields})
    template = np.frombuffer(zero.encode(), np.uint8).copy()
    static = np.ones(template.size, bool)
    columns: dict[tuple[str, int], int] = {}
    start = 0
    for q in range(n_q):
        for f in fields:
            key = f'"{f}": '
            pos = zero.index(key, start) + len(key)
            columns[(f, q)] = pos
            static[pos:pos + FIELD_WIDTH[f]] = False
            start = pos
    template[~static] = ord(" ")
    # digits gathered field-major, so each field's digits reshape to (n, quabos, width)
    numbers = tuple(sorted(columns, key=lambda fq: (fields.index(fq[0]), fq[1])))
    digit_cols = [c for f, q in numbers for c in range(columns[(f, q)],
                                                        columns[(f, q)] + FIELD_WIDTH[f])]
    spans, at = {}, 0
    for f in fields:
        spans[f] = (at, at + n_q * FIELD_WIDTH[f])
        at = spans[f][1]
    return HeaderLayout(template, static, columns, np.array(digit_cols), spans,
                        n_q, template.size // 4)


@dataclasses.dataclass(frozen=True)
class Product:
    """A PFF data product: what the pixels are and which header precedes them."""

    dp: str
    bpp: int
    shape: tuple[int, int]
    dtype: np.dtype
    header_kind: str  # "module" (4 quabo sub-headers) or "ph256" (one quabo)

    @property
    def family(self) -> str:
        """"ph" (pulse heights: ph256, ph1024) or "img" (images: img8, img16)."""
        return "ph" if self.dp.startswith("ph") else "img"

    @property
    def pixel_bytes(self) -> int:
        return self.shape[0] * self.shape[1] * self.dtype.itemsize

    @property
    def layout(self) -> HeaderLayout:
        return _LAYOUTS[self.header_kind]

    @property
    def header_bytes(self) -> int:
        return self.layout.size

    @property
    def frame_bytes(self) -> int:
        return self.header_bytes + len(DELIMITER) + self.pixel_bytes

    @property
    def header_sizes(self) -> frozenset[int]:
        """Every length the DAQ's printf can give this header.

        A module header has one to four quabo lines; each ``pkt_nsec >= 10**9`` adds a
        byte (every other number always fits its width).
        """
        return _HEADER_SIZES[self.header_kind]

    @property
    def fields(self) -> tuple[str, ...]:
        return PH256_FIELDS if self.header_kind == "ph256" else MODULE_FIELDS

    @property
    def header_shape(self) -> tuple[int, ...]:
        """Trailing shape of every header field array: (quabo,) or ()."""
        return () if self.header_kind == "ph256" else (N_QUABOS,)


_LAYOUTS = {kind: _header_layout(kind) for kind in ("module", "ph256")}
_QUABO_LINE_BYTES = (_LAYOUTS["module"].size - 1) // N_QUABOS  # a line and its ", \n"
_HEADER_SIZES = {
    "module": frozenset(k * _QUABO_LINE_BYTES + 1 + g
                        for k in range(1, N_QUABOS + 1) for g in range(k + 1)),
    "ph256": frozenset({_LAYOUTS["ph256"].size, _LAYOUTS["ph256"].size + 1}),
}

PRODUCTS: dict[str, Product] = {
    "img16": Product("img16", 2, (32, 32), np.dtype("<u2"), "module"),
    "img8": Product("img8", 1, (32, 32), np.dtype("u1"), "module"),
    "ph1024": Product("ph1024", 2, (32, 32), np.dtype("<i2"), "module"),
    "ph256": Product("ph256", 2, (16, 16), np.dtype("<i2"), "ph256"),
}


def get_product(dp: str) -> Product:
    try:
        return PRODUCTS[dp]
    except KeyError:
        raise PFFNameError(f"unknown data product dp_{dp!s} (known: "
                           f"{', '.join(PRODUCTS)})") from None
