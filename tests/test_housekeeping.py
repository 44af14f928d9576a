"""hk.pff -> <run>.hk.zarr: the store holds exactly the records the generator wrote.

The expected values come from parsing the generator's file here, independently of
:mod:`panoseti_pipeline.housekeeping`: split on blank lines, ``json.loads``, ``Decimal``
for the times.
"""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from panoseti_pipeline import housekeeping, run_bundle, synthetic
from panoseti_pipeline.errors import StoreError

PYPFF_MISSING = "pypff>=1.0.4 is not installed (requirements-test.txt); it is the judge here"


def records_of(path: Path) -> tuple[list[tuple[str, dict[str, str]]], str]:
    """(complete records as (source, fields), the cut tail) of a generated hk.pff."""
    *texts, tail = path.read_text().split("\n\n")
    return [next(iter(json.loads(t).items())) for t in texts], tail


def ns(text: str) -> int:
    return int(Decimal(text) * 1_000_000_000)


def test_store_values_equal_the_records_written(tmp_path: Path) -> None:
    hk_file = synthetic.write_housekeeping(tmp_path, 60, modules=(1, 254))
    records, tail = records_of(hk_file)
    assert len(records) == 59 and tail  # the generator cut the 60th

    store = tmp_path / "run.hk.zarr"
    facts = housekeeping.convert_hk(hk_file, store, tmp_path / "run.hk.png")
    assert facts["records"] == 59 and facts["cut_last_record"] == 1

    root = zarr.open_group(str(store), mode="r")
    assert root.attrs["records"] == 59 and root.attrs["cut_last_record"] == 1
    assert root.attrs["cut_bytes"] == len(tail.encode())
    assert "processing_level" not in root.attrs  # not a data product
    by_source: dict[str, list[dict[str, str]]] = {}
    for source, fields in records:
        by_source.setdefault(source, []).append(fields)
    assert sorted(g for g, _ in root.groups()) == sorted(by_source)
    assert root.attrs["records_by_source"] == {s: len(r) for s, r in by_source.items()}
    tree = xr.open_datatree(store, engine="zarr")
    checked = 0
    for source, recs in by_source.items():
        group = root[source]
        ds = tree[source].dataset
        want_t = np.array([ns(r["Computer_UTC"]) for r in recs], dtype=np.int64)
        np.testing.assert_array_equal(group["time"][:], want_t)
        np.testing.assert_array_equal(ds["time"].values, want_t.astype("datetime64[ns]"))
        fields = {f for r in recs for f in r} - {"Computer_UTC"}
        assert set(group.array_keys()) == {"time", *fields}
        for field in fields:
            got = group[field][:]
            assert group[field].attrs["hk_field"] == field
            texts = [r[field] for r in recs]
            if got.dtype.kind == "i":
                assert got.tolist() == [int(t) for t in texts], (source, field)
            elif got.dtype.kind == "f":
                assert got.tolist() == [float(t) for t in texts], (source, field)
            else:
                assert list(got) == texts, (source, field)
            checked += 1
    assert checked > 100
    # the kinds a user relies on: numbers are numbers, identifiers stay as written
    quabo = root["QUABO_1016"]
    assert quabo.attrs["module"] == 254 and quabo.attrs["quabo"] == 0
    assert quabo["TEMP1"].dtype == np.float64 and quabo["HVMON0"].dtype == np.float64
    assert quabo["BOARDLOC"].dtype == np.int64
    assert list(quabo["FWVER"][:])[0] == "0208" and str(quabo["UID"][0]).startswith("0x")
    assert root["WRSWITCH"]["Port 1_LINK"].dtype == np.int64
    png = (tmp_path / "run.hk.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_the_plot_s_time_ticks_are_utc_dates_and_hours(tmp_path: Path) -> None:
    """Not ``34:46.000000``: every time tick has the date and the hour, in UTC, and the
    ticks lie within the records' times."""
    import datetime as dt
    import re

    import matplotlib.pyplot as plt

    hk_file = synthetic.write_housekeeping(tmp_path, 60, modules=(1,))
    records, _ = records_of(hk_file)
    times = [dt.datetime.fromtimestamp(float(Decimal(f["Computer_UTC"])), dt.timezone.utc)
             for _s, f in records]
    fig = housekeeping.hk_figure(housekeeping.parse_hk(hk_file.read_bytes()))
    try:
        fig.canvas.draw()
        axis = fig.axes[-1]
        labels = [t.get_text() for t in axis.get_xticklabels() if t.get_text()]
        assert axis.get_xlabel().startswith("UTC")
    finally:
        plt.close(fig)
    assert len(labels) >= 2, labels
    for label in labels:
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", label), label
        tick = dt.datetime.strptime(label, "%Y-%m-%d %H:%M:%S").replace(tzinfo=dt.timezone.utc)
        assert min(times) - dt.timedelta(minutes=1) <= tick <= max(times) + dt.timedelta(
            minutes=1), (label, min(times), max(times))


def test_a_whole_last_record_is_kept_and_a_bad_one_is_counted(tmp_path: Path) -> None:
    hk_file = synthetic.write_housekeeping(tmp_path, 14, modules=(1,))
    records, _ = records_of(hk_file)
    texts = [json.dumps({s: f}) for s, f in records]
    # a record with an empty value and one without a field, and garbage in the middle
    temp = dict(records[0][1], TEMP1="", V12MON="")
    del temp["V18MON"]
    texts[0] = json.dumps({records[0][0]: temp})
    texts.insert(3, '{"QUABO_4": {"TEMP1": "40"}}')  # no Computer_UTC
    odd = {"Computer_UTC": records[1][1]["Computer_UTC"], "time": "1", ".": "x", "a/b": "2"}
    texts[1] = json.dumps({records[1][0]: {**records[1][1], **odd}})  # names Zarr reserves
    hk_file.write_text("".join(f"{t}\n\n" for t in texts))  # ends cleanly

    store = tmp_path / "s.hk.zarr"
    housekeeping.convert_hk(hk_file, store)
    root = zarr.open_group(str(store), mode="r")
    assert root.attrs["cut_last_record"] == 0 and root.attrs["records"] == 13
    assert root.attrs["unreadable_records"] == 1
    (bad,) = root.attrs["unreadable_records_listed"]
    assert bad["offset"] == sum(len(t) + 2 for t in texts[:3]) and "Computer_UTC" in bad["reason"]
    odd_group = root[records[1][0]]
    for name, field, value in (("field_time", "time", 1), ("field_.", ".", "x"),
                               ("a_b", "a/b", 2)):
        assert odd_group[name].attrs["hk_field"] == field and odd_group[name][0] == value
    assert records[0][0] == records[8][0] == "QUABO_4"  # one period: 4 quabos + 4 others
    board = root["QUABO_4"]
    for field in ("TEMP1", "V12MON", "V18MON"):  # empty or absent: NaN, the rest numbers
        assert board[field].dtype == np.float64
        assert np.isnan(board[field][0]) and board[field][1] == float(records[8][1][field])


def test_store_sits_beside_the_bundle_where_open_zarr_run_does_not_see_it(
        tmp_path: Path) -> None:
    """A run directory with products and our bundle: PANOSETI's reader lists the products
    only (it keys every top-level *.zarr by data product and module), and the bundle's
    sidecars only (the housekeeping store and PNG are beside it, not in it)."""
    pypff_zarr = pytest.importorskip("pypff.zarr", reason=PYPFF_MISSING)
    from pypff.io2 import PanosetiRun

    run = synthetic.make_observation(tmp_path / "in", frames_per_file=20, files_per_stream=1)
    out = tmp_path / "out"
    stores = pypff_zarr.convert_run(PanosetiRun(run), out, write_sidecars=False)
    bundle = run_bundle.write_bundle(run, out, [], notice=lambda _: None)
    assert len(stores) == 2

    stem = run.name.removesuffix(".pffd")
    beside = out / f"{stem}.housekeeping"
    assert (beside / f"{stem}.hk.zarr" / "zarr.json").is_file()
    assert (beside / f"{stem}.hk.png").is_file()
    assert not list(bundle.glob("*.hk.*"))
    assert run_bundle.verify_bundle(bundle) == []
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["housekeeping"]["directory"] == beside.name
    assert manifest["housekeeping"]["store"] == f"{stem}.hk.zarr"
    assert manifest["housekeeping"]["cut_last_record"] == 1
    zrun = pypff_zarr.open_zarr_run(out)
    assert zrun.list_products() == ["dp_img16.bpp_2.module_1", "dp_ph256.bpp_2.module_1"]
    assert zrun.configs  # the bundle is found, its configs read
    assert {p.relative_to(bundle).as_posix() for p in zrun.list_sidecars()} == {
        *manifest["files"], "manifest.json"}
    # a rerun replaces the housekeeping it wrote; anything else there is refused
    run_bundle.write_bundle(run, out, [], notice=lambda _: None)
    (beside / "mine.txt").write_text("x")
    with pytest.raises(StoreError, match="not the housekeeping this pipeline writes"):
        run_bundle.write_bundle(run, out, [], notice=lambda _: None)
    assert (beside / "mine.txt").read_text() == "x"
    # ... and so is a store there whose zarr.json is not a group document of ours
    (beside / "mine.txt").unlink()
    document = beside / f"{stem}.hk.zarr" / "zarr.json"
    document.write_text("[]")
    with pytest.raises(StoreError, match="not the housekeeping this pipeline writes"):
        run_bundle.write_bundle(run, out, [], notice=lambda _: None)
    assert document.read_text() == "[]"


def test_computer_utc_to_ns_is_exact() -> None:
    assert housekeeping.utc_to_ns("1721882086.1234567891") == 1_721_882_086_123_456_789
    assert housekeeping.utc_to_ns("1721882086") == 1_721_882_086_000_000_000
    with pytest.raises(ValueError, match="not Unix seconds"):
        housekeeping.utc_to_ns("2024-07-25")


def test_a_housekeeping_failure_costs_the_store_not_the_bundle(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """hk.pff is input: whatever in it the converter refuses is a notice, and the bundle
    (configs, logs, hk.pff itself) is still written and verifies."""
    run = synthetic.make_observation(tmp_path / "in", frames_per_file=5, files_per_stream=1)

    def refuse(hk_file: Path, store: Path, png: Path, **_layout: object) -> dict:
        store.mkdir()  # a half-written store, to be removed
        raise ValueError("surprise in the records")

    monkeypatch.setattr(housekeeping, "convert_hk", refuse)
    notices: list[str] = []
    bundle = run_bundle.write_bundle(run, tmp_path / "out", [], notice=notices.append)
    assert run_bundle.verify_bundle(bundle) == []
    assert not list(bundle.glob("*.hk.*")) and not list(bundle.parent.glob("*.housekeeping*"))
    assert (bundle / "hk.pff").read_bytes() == (run / "hk.pff").read_bytes()
    assert any("no housekeeping store written (surprise in the records)" in n
               for n in notices)
    assert json.loads((bundle / "manifest.json").read_text())["housekeeping"] == {
        "error": "surprise in the records"}


@pytest.mark.parametrize(("values", "expected"), [
    (["1", "-2", "0"], [1, -2, 0]),                    # int64
    (["1", ""], [1.0, np.nan]),                        # an empty value: float64, NaN
    (["1", None], [1.0, np.nan]),                      # a record without the field
    (["-1.5e-3", "2.", ".5"], [-1.5e-3, 2.0, 0.5]),    # float64
    (["0208", "1"], ["0208", "1"]),                    # a leading zero: as written
    (["nan", "1"], ["nan", "1"]),                      # not a decimal number
    (["1\n2", "3"], ["1\n2", "3"]),                    # a newline inside a value
    (["99999999999999999999"], ["99999999999999999999"]),  # beyond int64: as written
    (["", ""], ["", ""]),
])
def test_column_kinds(values: list, expected: list) -> None:
    got = housekeeping.column(values)
    kind = {int: "i", float: "f", str: "O"}[type(expected[0])]
    assert got.dtype.kind == kind
    if kind == "f":
        np.testing.assert_array_equal(got, np.array(expected))
    else:
        assert got.tolist() == expected


def test_one_hostile_record_never_sinks_the_bundle_or_loses_a_field(tmp_path: Path) -> None:
    """Defects: ``Computer_UTC = "99999999999"`` raised OverflowError and a source or
    field named ``zarr.json`` FileExistsError (the bundle was not written); fields
    ``a/b`` and ``a_b`` became one array (a field lost silently); a trailing NUL of a
    value was stripped. Now a bad record is dropped and counted, a reserved or colliding
    name is renamed with a notice, every value is kept as written."""
    run = synthetic.make_observation(tmp_path / "in", frames_per_file=5, files_per_stream=1)
    records, _ = records_of(run / "hk.pff")
    source, fields = records[0]
    utc = fields["Computer_UTC"]
    hostile = [
        {source: {**fields, "Computer_UTC": "99999999999"}},  # after 2262: dropped
        {source: {**fields, "Computer_UTC": utc, "note": "\ud800"}},  # not UTF-8: dropped
        {"zarr.json": {"Computer_UTC": utc, "x": "1"}},
        {"GPSPRIM": {"Computer_UTC": utc, "zarr.json": "2", "a/b": "ab-slash",
                     "a_b": "ab-underscore", "nul": "x\x00"}},
    ]
    texts = [json.dumps({s: f}) for s, f in records] + [json.dumps(r) for r in hostile]
    (run / "hk.pff").chmod(0o644)
    (run / "hk.pff").write_text("".join(f"{t}\n\n" for t in texts))
    notices: list[str] = []
    bundle = run_bundle.write_bundle(run, tmp_path / "out", [], notice=notices.append)
    assert run_bundle.verify_bundle(bundle) == []
    store = next(bundle.parent.glob("*.housekeeping/*.hk.zarr"))
    root = zarr.open_group(str(store), mode="r")
    assert root.attrs["records"] == len(records) + 2
    assert root.attrs["unreadable_records"] == 2
    reasons = [r["reason"] for r in root.attrs["unreadable_records_listed"]]
    assert "out of range" in reasons[0] and "not UTF-8" in reasons[1]
    odd = root["field_zarr.json"]
    assert odd.attrs["hk_source"] == "zarr.json" and odd["x"][:].tolist() == [1]
    gps = root["GPSPRIM"]
    got = {gps[name].attrs["hk_field"]: gps[name][:].tolist()[-1]
           for name in gps.array_keys() if name != "time"}
    assert got["zarr.json"] == 2 and got["a/b"] == "ab-slash"
    assert got["a_b"] == "ab-underscore" and got["nul"] == "x\x00"
    assert gps["a_b"].attrs["hk_field"] == "a_b"  # the name as written keeps its name
    assert gps["a_b_2"].attrs["hk_field"] == "a/b"
    assert root.attrs["renamed"] == {"field_zarr.json": "zarr.json",
                                     "GPSPRIM/field_zarr.json": "zarr.json",
                                     "GPSPRIM/a_b_2": "a/b"}
    assert any("3 source or field names stored under another name" in n for n in notices)


def test_hashset_stores_sort_by_time_and_keep_every_field(tmp_path: Path) -> None:
    """The team's layout: records out of time order are stably sorted (ties keep the
    file's order); a field named like a coordinate is stored under another name; a field
    named ``time`` keeps it; a kind with one record has no cadence; an existing store this
    pipeline did not write is refused, not replaced."""
    lines = [
        {"QUABO_9": {"Computer_UTC": "100.5", "TEMP1": "30.5", "module": "x"}},
        {"QUABO_4": {"Computer_UTC": "100.25", "TEMP1": "31", "time": "t1"}},
        {"QUABO_5": {"Computer_UTC": "100.5", "TEMP1": "", "UID": "0x1"}},
        {"QUABO_9": {"Computer_UTC": "102.5", "TEMP1": "32.5", "module": "y"}},
        {"WPS": {"Computer_UTC": "101", "POWER": "ON"}},
    ]
    hk_file = tmp_path / "hk.pff"
    hk_file.write_text("".join(json.dumps(r) + "\n\n" for r in lines))
    level = tmp_path / "L0"
    facts = housekeeping.convert_hk(hk_file, None, hk_level=level, notice=print)
    assert sorted(Path(p).name for p in facts["hk_stores"]) == ["hk.quabo.zarr", "hk.wps.zarr"]
    quabo = zarr.open_group(str(level / "hk.quabo.zarr"), mode="r")
    # sorted: 100.25 (QUABO_4), then the two at 100.5 in file order (9, 5), then 102.5
    np.testing.assert_array_equal(quabo["hk_t_ns"][:], [ns("100.25"), ns("100.5"),
                                                        ns("100.5"), ns("102.5")])
    np.testing.assert_array_equal(quabo["module"][:], [1, 2, 1, 2])
    np.testing.assert_array_equal(quabo["quabo"][:], [0, 1, 1, 1])
    np.testing.assert_array_equal(quabo["TEMP1"][:], [31.0, 30.5, np.nan, 32.5])
    assert list(quabo["field_module"][:]) == ["", "x", "", "y"]
    assert quabo["field_module"].attrs["hk_field"] == "module"
    assert list(quabo["time"][:]) == ["t1", "", "", ""]
    assert list(quabo["UID"][:]) == ["", "", "0x1", ""]
    assert quabo.attrs["renamed"] == {"field_module": "module"}
    assert quabo.attrs["cadence_ns"] == 2 * 10**9  # QUABO_9: 100.5 -> 102.5
    assert quabo.attrs["sources"] == ["QUABO_9", "QUABO_4", "QUABO_5"]
    wps = zarr.open_group(str(level / "hk.wps.zarr"), mode="r")
    assert wps.attrs["cadence_ns"] is None and list(wps["POWER"][:]) == ["ON"]
    assert "module" not in wps.array_keys()

    foreign = level / "hk.wps.zarr"
    other = tmp_path / "other"
    other.mkdir()
    (other / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')
    import shutil

    shutil.rmtree(foreign)
    other.rename(foreign)
    with pytest.raises(StoreError, match="not a housekeeping store this pipeline wrote"):
        housekeeping.convert_hk(hk_file, None, hk_level=level, notice=print)
    assert (foreign / "zarr.json").read_text().startswith('{"zarr_format": 3')
