"""Property-based fuzzing of the PFF reader against a slow, obviously-correct reference.

Random mutations of valid files (byte flips in headers and pixels, inserted and deleted
bytes, truncation): the strict reader must return exactly the reference's frames or raise
PFFFormatError; never another exception, a hang, or different values. The reference may
accept headers the DAQ never writes (e.g. other padding) where the reader refuses them:
being stricter is allowed, being different is not. The default reader skips what it
cannot read: every frame it returns must be a frame as written, in order: its bytes come
from one written frame and its pixel block is that frame's, in place (a byte flipped in
place, or a header edited into another exact header, is undetectable by any reader); and
the frames, skipped ranges and dropped tail must account for every byte of the file.

CI runs a bounded number of examples; for a long run:
``PANOSETI_FUZZ_EXAMPLES=20000 tests/run_tests.sh tests/test_pff_fuzz.py``.
"""

from __future__ import annotations

import bisect
import json
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from panoseti_pipeline import pff
from panoseti_pipeline import synthetic as synthetic_obs
from panoseti_pipeline.errors import PFFFormatError
from panoseti_pipeline.pff.headers import header_values

EXAMPLES = int(os.environ.get("PANOSETI_FUZZ_EXAMPLES", "300"))


class Invalid(Exception):
    pass


def reference_read(data: bytes, product: pff.Product):
    """Frame by frame, straight from PFF_FORMAT.md: JSON header, '*', N pixel bytes.

    Headers are never shorter than the printf widths make them, nor more than 16 bytes
    longer, and never hold a blank line; less than one frame at the end is a partial
    frame when it starts like one.
    """
    images, headers, pos = [], [], 0
    h = product.header_bytes
    while pos < len(data):
        if data[pos:pos + 1] != b"{":
            raise Invalid(pos)
        if len(data) - pos < product.frame_bytes:
            break  # a partial last frame
        end = data.find(b"\n\n", pos, pos + h + 16 + 2)
        if end < pos + h:
            raise Invalid(pos)
        if end + 3 + product.pixel_bytes > len(data):
            break  # a longer last frame, cut
        if data[end + 2:end + 3] != b"*":
            raise Invalid(pos)
        try:
            fields = header_values("ref", pos, json.loads(data[pos:end]), product)
        except (ValueError, PFFFormatError):
            raise Invalid(pos) from None
        headers.append(fields)
        images.append(np.frombuffer(data, product.dtype, product.pixel_bytes
                                    // product.dtype.itemsize, end + 3))
        pos = end + 3 + product.pixel_bytes
    return images, headers


def valid_file(dp: str, n: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    spec = synthetic_obs.StreamSpec(dp=dp)
    times = (int(synthetic_obs.DEFAULT_START.timestamp()) * 10**9
             + np.arange(n, dtype=np.int64) * 1_000_000)
    headers = synthetic_obs.synth_headers(rng, spec, times, 0)
    if n > 2:
        headers["pkt_nsec"][1] = 1_000_000_000 + 7  # one walked frame to start with
    return pff.encode_frames(dp, synthetic_obs.synth_images(rng, spec, n, 0), headers)


in_place = st.one_of(  # the length of the file stays
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("header_flip"), st.integers(0, 10**6), st.integers(1, 255)),
)
shift = st.one_of(  # every byte after it moves
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.just(0)),
)
truncate = st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0))
mutation = st.one_of(in_place, shift, truncate)


def mutate(data: bytes, ops, product: pff.Product) -> tuple[bytes, np.ndarray]:
    """The mutated bytes, and where each was in ``data`` (-1: inserted)."""
    buf = bytearray(data)
    origin = list(range(len(data)))
    for op, at, value in ops:
        if not buf:
            break
        i = at % len(buf)
        if op == "header_flip":  # aim at header bytes, where the parser works
            frame = (at // product.header_bytes) % max(1, len(buf) // product.frame_bytes)
            i = min(len(buf) - 1, frame * product.frame_bytes + at % product.header_bytes)
        if op in ("flip", "header_flip"):
            buf[i] ^= value
        elif op == "insert":
            buf.insert(i, value)
            origin.insert(i, -1)
        elif op == "delete":
            del buf[i], origin[i]
        else:
            del buf[i:], origin[i:]
    return bytes(buf), np.array(origin, np.int64)


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dp=st.sampled_from(["img8", "ph256", "img16"]), seed=st.integers(0, 3),
       ops=st.lists(mutation, min_size=1, max_size=3))
def test_mutated_files_read_exactly_or_fail_cleanly(tmp_path, dp, seed, ops):
    product = pff.PRODUCTS[dp]
    data, _ = mutate(valid_file(dp, 6, seed), ops, product)
    path = tmp_path / f"start_2024-07-25T04:34:46Z.dp_{dp}.bpp_{product.bpp}.module_1.seqno_0.pff"
    path.write_bytes(data)
    try:
        want = reference_read(data, product)
    except Invalid:
        want = None
    try:
        with pff.PFFReader(path, strict=True) as reader:
            got = [f for _, f in reader.blocks(4, copy=True)]
    except PFFFormatError:
        return  # refusing is always allowed
    assert want is not None, "the reader accepted a file the reference refuses"
    images = np.concatenate([f.images for f in got]) if got else np.empty((0,))
    assert len(images) == len(want[0])
    if want[0]:
        np.testing.assert_array_equal(images.reshape(len(want[0]), -1),
                                      np.stack(want[0]))
        for field in product.fields:
            mine = np.concatenate([f.headers[field] for f in got])
            np.testing.assert_array_equal(mine, np.array([h[field] for h in want[1]]))


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dp=st.sampled_from(["img8", "ph256", "img16"]), seed=st.integers(0, 3),
       flips=st.lists(in_place, max_size=3), moved=st.lists(shift, max_size=1),
       cut=st.lists(truncate, max_size=1))
def test_skipping_reader_returns_only_frames_as_written(tmp_path, dp, seed, flips, moved, cut):
    # at most one insert or delete: two could make a frame of the right length with
    # shifted pixels, which no reader can tell from one as written
    product = pff.PRODUCTS[dp]
    name = f"start_2024-07-25T04:34:46Z.dp_{dp}.bpp_{product.bpp}.module_1.seqno_0.pff"
    original = valid_file(dp, 6, seed)
    clean = tmp_path / "clean" / name
    clean.parent.mkdir(exist_ok=True)
    clean.write_bytes(original)
    truth = pff.index_file(clean)
    want = pff.read_frames(clean, truth, 0, truth.n_frames)
    starts = {int(o): len(pff.encode_frames(dp, want.images[j:j + 1],
                                            {k: v[j:j + 1] for k, v in want.headers.items()}))
              for j, o in enumerate(truth.offsets())}
    data, origin = mutate(original, [*flips, *moved, *cut], product)
    path = tmp_path / name
    path.write_bytes(data)
    try:
        with pff.PFFReader(path) as reader:
            got = [f for _, f in reader.blocks(4, copy=True)]
            index = reader.index
    except PFFFormatError:
        return  # refusing is always allowed
    assert sum(len(f) for f in got) == index.n_frames
    frame_bytes = sum((b - a) * s for a, b, _o, s in index.segments(0, index.n_frames))
    assert (frame_bytes + sum(r.length for r in index.skipped) + index.partial_bytes
            + index.nul_tail_bytes) == len(data)
    lengths = np.zeros(index.n_frames, np.int64)
    for a, b, _o, stride in index.segments(0, index.n_frames):
        lengths[a:b] = stride
    images = np.concatenate([f.images for f in got]) if got else []
    headers = {h: np.concatenate([f.headers[h] for f in got]) for h in product.fields} \
        if got else {}
    order = sorted(starts)
    last = -1
    for k, off in enumerate(index.offsets()):
        same = [j for j in range(len(want)) if np.array_equal(images[k], want.images[j])
                and all(np.array_equal(headers[h][k], want.headers[h][j])
                        for h in product.fields)]
        src = origin[off:off + lengths[k]]  # where the frame's bytes were written
        body = src[-product.pixel_bytes:]
        j = max(0, bisect.bisect_right(order, int(body[0])) - 1)
        o = order[j]
        as_written = (body[0] == o + starts[o] - body.size  # its pixels, in place
                      and np.array_equal(body, body[0] + np.arange(body.size))
                      and ((src == -1) | ((src >= o) & (src < o + starts[o]))).all())
        assert same or as_written, f"frame {k} at byte {off} is not a frame as written"
        j = same[0] if same else j
        assert j > last, "frames out of order"
        last = j


@pytest.mark.parametrize("dp", ["img16", "ph256"])
def test_reference_agrees_on_clean_files(dp):
    data = valid_file(dp, 5, 1)
    images, headers = reference_read(data, pff.PRODUCTS[dp])
    assert len(images) == 5 and np.ravel(headers[1]["pkt_nsec"])[0] == 1_000_000_007
