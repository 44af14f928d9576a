"""store/shard_reader.py reads our own shard files as zarr reads them, and refuses damage.

The stores are real output of step 1 and step 2 (small chunks and shards, so reads cross
chunk and shard boundaries and the last shard is partial), and arrays written with
:mod:`panoseti_pipeline.store.shards` for every codec; zarr's own reading of the same
files is the reference. Stores of other layouts must be left to zarr.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from test_store_shards import CODECS, create, write_ours

from panoseti_pipeline import pff, step1, synthetic
from panoseti_pipeline.config import from_dict
from panoseti_pipeline.errors import StoreError
from panoseti_pipeline.step2 import l0_input, subtract_baseline
from panoseti_pipeline.store import layout, spec
from panoseti_pipeline.store.shard_reader import ShardedFrames, frames_of
from panoseti_pipeline.store.shards import ChunkCodec

CHUNK, PER_SHARD, FRAMES = 64, 3, 700  # shards of 192 frames; the 4th holds 124
CONFIG = from_dict({"cluster": {"use_dask": False},
                    "pff_to_zarr": {"time_chunk": CHUNK, "shard_factor": PER_SHARD},
                    "baseline_subtract": {"compute_chunk_size": CHUNK,
                                          "shard_factor": PER_SHARD, "baseline_window": 50}})
#: frame ranges: within a chunk, across chunks, across shards, first and last shards
RANGES = [(0, 1), (5, 60), (60, 70), (0, 192), (150, 250), (190, 577), (576, 700),
          (640, 700), (699, 700), (0, 700), (300, 300)]


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """L0 and L1 stores of img16 and ph256 (700 frames each) made by steps 1 and 2."""
    root = tmp_path_factory.mktemp("stores")
    run = synthetic.make_observation(root / "in", seed=3, products=("img16", "ph256"),
                                     frames_per_file=FRAMES // 2, files_per_stream=2,
                                     faults=("missing_quabo",))
    names = [pff.parse_name(p) for p in run.glob("*.pff") if p.name != pff.HOUSEKEEPING_NAME]
    streams, _ = pff.group_streams(names)
    out = {}
    for s in (s for s in streams if s.dp in ("img16", "ph256")):  # not the 0-byte files
        l0, l1 = root / f"{s.dp}_L0.zarr", root / f"{s.dp}_L1.zarr"
        step1.convert([n.path for n in s.data_files], l0, CONFIG, quiet=True,
                      notice=lambda _m: None)
        subtract_baseline(l0, l1, CONFIG, quiet=True, notice=lambda _m: None)
        out[f"{s.dp}_L0"], out[f"{s.dp}_L1"] = l0, l1
    return out


def frame_arrays(path: Path) -> dict[str, zarr.Array]:
    group = zarr.open_group(str(path), mode="r")
    return {k: v for k, v in l0_input.arrays_of(group).items()
            if v.metadata.dimension_names[0] == "time"}


def index_of(shard: Path, per_shard: int = PER_SHARD) -> np.ndarray:
    raw = shard.read_bytes()
    return np.frombuffer(raw[-(16 * per_shard + 4):-4], "<u8").reshape(per_shard, 2)


@pytest.mark.parametrize("name", ["img16_L0", "ph256_L0", "img16_L1", "ph256_L1"])
def test_every_array_and_range_reads_as_zarr_reads_it(stores, name):
    arrays = frame_arrays(stores[name])
    product = pff.PRODUCTS[name.split("_")[0]]
    expected = {a.name for a in spec.frame_arrays(product, 1)}
    assert set(arrays) == expected | ({"l0_frame"} if name.endswith("L1") else set())
    dtypes = set()
    for array_name, array in arrays.items():
        ours = frames_of(array)
        assert isinstance(ours, ShardedFrames), array_name
        assert array.shape[0] == FRAMES
        for a, b in RANGES:
            got, expected = ours[a:b], array[a:b]
            assert got.dtype == expected.dtype and got.shape == expected.shape
            np.testing.assert_array_equal(got, expected, err_msg=f"{array_name}[{a}:{b}]")
        dtypes.add(array.dtype)
    # the stores hold integers of every width and float32 (L1 images, NaN where missing)
    assert len(dtypes) >= (3 if name.endswith("L0") else 4)


def test_step2_reads_its_l0_through_the_shard_reader(stores):
    """The L0 arrays step 2's tasks get; read_frames mixes them with zarr arrays."""
    path = stores["img16_L0"]
    info = l0_input.inspect_l0(path)
    names = ["images", *info.carried]
    assert all(isinstance(info.array(n), ShardedFrames) for n in names)
    zarr_arrays = frame_arrays(path)
    mixed = {n: info.array(n) if i % 2 else zarr_arrays[n] for i, n in enumerate(names)}
    for got, (a, b) in zip(layout.read_ranges(mixed, RANGES), RANGES, strict=True):
        for n in names:
            np.testing.assert_array_equal(got[n], zarr_arrays[n][a:b])


@pytest.mark.parametrize("codec", CODECS, ids=[c.codec for c in CODECS])
@pytest.mark.parametrize("dtype,shape", [("<u2", (4, 4)), ("u1", ()), ("<i8", ()),
                                         ("<f4", (2, 3))])
def test_every_codec_of_our_writer(tmp_path, codec, dtype, shape):
    rng = np.random.default_rng(1)
    data = rng.integers(-100, 200, (1000, *shape)).astype(dtype)
    create(tmp_path / "a.zarr", data, codec, 4)
    write_ours(tmp_path / "a.zarr", data, codec, 4)
    array = zarr.open_array(str(tmp_path / "a.zarr"), mode="r")
    ours = frames_of(array)
    assert isinstance(ours, ShardedFrames)
    for a, b in [(0, 1000), (250, 260), (63, 65), (250, 770), (960, 1000)]:
        np.testing.assert_array_equal(ours[a:b], data[a:b])


def test_absent_chunks_and_shards_read_as_the_fill_value(tmp_path):
    """zarr leaves out chunks equal to the fill value and shards holding only those."""
    data = np.arange(1000 * 4, dtype="<i4").reshape(1000, 4) + 1
    data[64:128] = 7  # one whole chunk of fill value
    data[512:768] = 7  # one whole shard
    array = zarr.create_array(str(tmp_path / "a.zarr"), shape=data.shape, chunks=(64, 4),
                              shards=(256, 4), dtype=data.dtype, fill_value=7,
                              compressors=layout.compressors(
                                  ChunkCodec("blosc-lz4", 5, "bit", True)),
                              config={"write_empty_chunks": False})
    array[:] = data
    assert not (tmp_path / "a.zarr" / "c" / "2" / "0").exists()
    assert (index_of(tmp_path / "a.zarr" / "c" / "0" / "0", 4)[1] == 2**64 - 1).all()
    ours = frames_of(zarr.open_array(str(tmp_path / "a.zarr"), mode="r"))
    assert isinstance(ours, ShardedFrames)
    for a, b in [(0, 1000), (100, 600), (520, 530)]:
        np.testing.assert_array_equal(ours[a:b], data[a:b])


# --------------------------------------------------------------------------- damage


def damaged_copy(stores: dict[str, Path], tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the img16 L0 and the file of its second images shard."""
    copy = tmp_path / "l0.zarr"
    shutil.copytree(stores["img16_L0"], copy)
    return copy, copy / "images" / "c" / "1" / "0" / "0"


def read_images(store: Path) -> np.ndarray:
    return frames_of(zarr.open_array(str(store / "images"), mode="r"))[0:FRAMES]


def test_a_flipped_byte_in_a_chunk_names_the_file_and_chunk(stores, tmp_path):
    store, shard = damaged_copy(stores, tmp_path)
    offset, nbytes = index_of(shard)[1]
    data = bytearray(shard.read_bytes())
    data[int(offset + nbytes // 2)] ^= 0x40
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=rf"{shard}: inner chunk 1 .*CRC32C"):
        read_images(store)
    # frames of the other chunks still read
    ours = frames_of(zarr.open_array(str(store / "images"), mode="r"))
    np.testing.assert_array_equal(ours[192:256], read_images(stores["img16_L0"])[192:256])


@pytest.mark.parametrize("cut", [1, 100, 16 * PER_SHARD + 4, 10**6])
def test_a_truncated_shard_names_the_file(stores, tmp_path, cut):
    store, shard = damaged_copy(stores, tmp_path)
    data = shard.read_bytes()
    shard.write_bytes(data[: max(0, len(data) - cut)])
    with pytest.raises(StoreError, match=rf"{shard}: .*truncated"):
        read_images(store)


def test_a_flipped_byte_in_the_index_names_the_file(stores, tmp_path):
    store, shard = damaged_copy(stores, tmp_path)
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=rf"{shard}: shard index damaged"):
        read_images(store)


# --------------------------------------------------------------------------- other layouts


@pytest.mark.filterwarnings("ignore:Combining a .sharding_indexed. codec")
@pytest.mark.parametrize("kind", ["unsharded", "zstd", "no index checksum", "filters"])
def test_other_layouts_are_left_to_zarr(tmp_path, kind):
    data = np.random.default_rng(2).integers(0, 5000, (500, 3, 3)).astype("<u2")
    kwargs: dict = {"chunks": (50, 3, 3), "shards": (200, 3, 3),
                    "compressors": layout.compressors(ChunkCodec("blosc-lz4", 5, "bit", True))}
    if kind == "unsharded":
        kwargs.pop("shards")
    elif kind == "zstd":
        kwargs["compressors"] = [zarr.codecs.ZstdCodec(level=3), zarr.codecs.Crc32cCodec()]
    elif kind == "no index checksum":
        kwargs.pop("shards")
        kwargs["serializer"] = zarr.codecs.ShardingCodec(
            chunk_shape=(50, 3, 3), codecs=[zarr.codecs.BytesCodec()],
            index_codecs=[zarr.codecs.BytesCodec()])
        kwargs["chunks"] = (200, 3, 3)
        kwargs.pop("compressors")
    else:
        kwargs["filters"] = [zarr.codecs.TransposeCodec(order=(0, 2, 1))]
    array = zarr.create_array(str(tmp_path / "a.zarr"), shape=data.shape, dtype=data.dtype,
                              **kwargs)
    array[:] = data
    got = frames_of(zarr.open_array(str(tmp_path / "a.zarr"), mode="r"))
    assert not isinstance(got, ShardedFrames)
    np.testing.assert_array_equal(layout.read_frames({"x": got}, 120, 430)["x"], data[120:430])


def test_an_l0_of_pypff_is_read_by_zarr(tmp_path):
    pypff_zarr = pytest.importorskip("pypff.zarr")
    from pypff.io2 import PanosetiRun

    run = synthetic.make_observation(tmp_path / "in", seed=4, products=("img16",),
                                     frames_per_file=150, files_per_stream=2)
    (l0,) = pypff_zarr.convert_run(PanosetiRun(run), tmp_path / "pypff", shard_factor=2)
    info = l0_input.inspect_l0(l0)
    names = ["images", *info.carried]
    assert not any(isinstance(info.array(n), ShardedFrames) for n in names)
    got = layout.read_frames({n: info.array(n) for n in names}, 10, 290)
    for n in names:
        np.testing.assert_array_equal(got[n], zarr.open_array(str(l0 / n))[10:290])
