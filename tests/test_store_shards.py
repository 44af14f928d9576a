"""store/shards.py writes exactly the chunk and shard files zarr itself would write."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
import zarr.codecs as zc

from panoseti_pipeline.store.shards import ChunkCodec, ChunkFiles, pad_chunk

CODECS = [ChunkCodec("blosc-lz4", 5, "bit", True), ChunkCodec("zstd", 1, "byte", False),
          ChunkCodec("none", 1, "none", True), ChunkCodec("gzip", 3, "none", True)]
N, C = 1000, 64  # 16 chunks, the last one partial


def zarr_compressors(codec: ChunkCodec) -> list:
    out: list = []
    if codec.codec in ("blosc-lz4", "zstd"):
        out.append(zc.BloscCodec(cname="lz4" if codec.codec == "blosc-lz4" else "zstd",
                                 clevel=codec.level,
                                 shuffle={"bit": "bitshuffle", "byte": "shuffle"}[codec.shuffle]))
    elif codec.codec == "gzip":
        out.append(zc.GzipCodec(level=codec.level))
    if codec.checksum:
        out.append(zc.Crc32cCodec())
    return out


def create(path: Path, data: np.ndarray, codec: ChunkCodec, per_shard: int) -> zarr.Array:
    kwargs = {"shards": (C * per_shard, *data.shape[1:])} if per_shard else {}
    return zarr.create_array(str(path), shape=data.shape, chunks=(C, *data.shape[1:]),
                             dtype=data.dtype, compressors=zarr_compressors(codec) or None,
                             fill_value=0, config={"write_empty_chunks": True}, **kwargs)


def write_ours(path: Path, data: np.ndarray, codec: ChunkCodec, per_shard: int) -> None:
    """As two tasks would: each owns whole shards (or chunks) and writes them in order."""
    n_chunks = -(-len(data) // C)
    encode = codec.encoder(data.dtype)
    split = 2 * (per_shard or 1)
    for lo, hi in ((0, split), (split, n_chunks)):
        files = ChunkFiles(path, data.ndim, lo, per_shard, n_chunks)
        for k in range(lo, hi):
            files.add(encode(pad_chunk(data[k * C:(k + 1) * C], C)))
        files.close()


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != "zarr.json"}


@pytest.mark.parametrize("per_shard", [0, 4])
@pytest.mark.parametrize("codec", CODECS, ids=[c.codec for c in CODECS])
@pytest.mark.parametrize("dtype,shape", [("<u2", (32, 32)), ("u1", (16, 16)), ("<i8", ()),
                                         ("<f4", (8, 8))])
def test_files_equal_zarrs_own(tmp_path, per_shard, codec, dtype, shape):
    rng = np.random.default_rng(7)
    data = rng.integers(-100 if dtype[1] in "if" else 0, 200, (N, *shape)).astype(dtype)
    create(tmp_path / "ref.zarr", data, codec, per_shard)[:] = data
    create(tmp_path / "ours.zarr", data, codec, per_shard)
    write_ours(tmp_path / "ours.zarr", data, codec, per_shard)
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "ours.zarr"))[:], data)
    ref, ours = tree(tmp_path / "ref.zarr"), tree(tmp_path / "ours.zarr")
    assert sorted(ours) == sorted(ref)
    assert len(ours) == (-(-N // (C * per_shard)) if per_shard else -(-N // C))
    if codec.codec == "gzip":
        # zarr's gzip stamps the time into each chunk; ours is deterministic (mtime 0)
        write_ours(tmp_path / "again.zarr", data, codec, per_shard)
        assert tree(tmp_path / "again.zarr") == ours
    else:
        assert ours == ref


def test_a_chunk_past_the_end_is_refused(tmp_path):
    files = ChunkFiles(tmp_path / "a", 1, 1, 0, 1)
    with pytest.raises(ValueError, match="past the array"):
        files.add((b"x",))
