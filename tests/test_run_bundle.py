"""The run bundle (<run>.panoseti-meta/) on generated observations, judged by pypff.

PANOSETI's own library is the reference: its ``convert_run`` writes the bundle we must match
file for file, and its ``open_zarr_run`` reads ``configs`` from ours. Also here: the run
metadata and ``hk.pff`` the synthetic generator writes (PFF_FORMAT.md §8).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from pathlib import Path

import pytest

from panoseti_pipeline import run_bundle
from panoseti_pipeline import synthetic as synthetic_obs
from panoseti_pipeline.errors import InputError, StoreError
from panoseti_pipeline.run_bundle import ProductSummary

PYPFF_MISSING = "pypff>=1.0.4 is not installed (requirements-test.txt); it is the judge here"
T0_NS = 1_721_882_086_123_456_789  # 2024-07-25T04:34:46.123456789Z
# what the generator writes besides data, by pypff's rules (run_bundle.RULES)
GENERATED = ["configs/daq_config.json", "configs/data_config.json", "configs/obs_config.json",
             *(f"configs/quabo_config_192.168.0.{4 + q}.json" for q in range(4)),
             "configs/quabo_ph_baseline.json", "configs/quabo_uids.json",
             "configs/sw_info.json", "hk.pff", "logs/hp_stdout_192.168.1.100",
             "sentinels/collect_complete", "sentinels/recording_ended",
             "sentinels/run_complete"]
EXTRAS = {"dp_manifest_1.json": '{"files": []}', "pipeline.toml": "a = 1\n",
          "daq.log": "log\n", "notes.txt": "seeing 1.2\"\n", "events.jsonl": "{}\n"}


@pytest.fixture()
def run(tmp_path: Path) -> Path:
    return synthetic_obs.make_observation(tmp_path / "in", frames_per_file=20,
                                          files_per_stream=1)


def products_of(run: Path) -> list[ProductSummary]:
    """Made-up product facts (the bundle only records them)."""
    return [ProductSummary(store=f"{run.name}.dp_{dp}.bpp_2.module_1.zarr", data_product=dp,
                           module=1, level="L1", frames=20, first_ns=T0_NS,
                           last_ns=T0_NS + 19_000_000)
            for dp in ("img16", "ph256")]


def write(run: Path, out: Path, notices: list[str] | None = None) -> Path:
    notices = [] if notices is None else notices
    return run_bundle.write_bundle(run, out, products_of(run), notice=notices.append)


def tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (relative path -> bytes)."""
    return {p.relative_to(path).as_posix(): p.read_bytes()
            for p in sorted(path.rglob("*")) if p.is_file()}


def copied(bundle: Path) -> dict[str, bytes]:
    """The bundle's files: all copied from the run, but its manifest."""
    return tree(bundle)


def state(path: Path) -> dict[str, tuple[int, int, bytes]]:
    """mtime, mode and bytes of every entry under ``path``."""
    return {p.relative_to(path).as_posix(): (p.stat().st_mtime_ns, p.stat().st_mode,
                                             p.read_bytes() if p.is_file() else b"")
            for p in sorted(path.rglob("*"))}


def parsed_json_files(run: Path, skip: str = "") -> dict[str, object]:
    """The run's JSON files parsed, keyed by stem: what ``configs`` must equal."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(run.glob("*.json"))
            if p.name != skip}


# ------------------------------------------------------------------------------ bundle


def test_bundle_copies_the_run_metadata_byte_identical(run: Path, tmp_path: Path) -> None:
    for name, text in EXTRAS.items():
        (run / name).write_text(text)
    (run / "subdir").mkdir()
    notices: list[str] = []
    bundle = write(run, tmp_path / "out", notices)

    assert bundle == tmp_path / "out" / f"{run.name}.panoseti-meta"
    got = copied(bundle)
    expected = {*GENERATED, "configs/dp_manifest_1.json", "manifests/dp_manifest_1.json",
                "configs/pipeline.toml", "logs/daq.log", "logs/notes.txt", "manifest.json"}
    assert set(got) == expected
    for rel in expected - {"manifest.json"}:
        source = run / Path(rel).name
        assert got[rel] == source.read_bytes(), rel
        assert (bundle / rel).stat().st_mtime_ns == source.stat().st_mtime_ns, rel
    stem = run.name.removesuffix(".pffd")
    assert sorted(p.name for p in bundle.iterdir() if p.is_dir()) == [
        "configs", "logs", "manifests", "sentinels"]
    housekeeping = bundle.parent / f"{stem}.housekeeping"  # derived: beside the bundle
    assert sorted(p.name for p in housekeeping.iterdir()) == [f"{stem}.hk.png",
                                                             f"{stem}.hk.zarr"]
    assert (housekeeping / f"{stem}.hk.png").read_bytes().startswith(b"\x89PNG")
    assert not list(bundle.parent.glob("*.partial"))
    (left,) = notices  # what the bundle does not keep is said, once
    assert str(run) in left and "2 entries" in left
    assert "events.jsonl" in left and "subdir/" in left


def test_manifest_lists_products_and_checksums_that_verify(run: Path, tmp_path: Path) -> None:
    bundle = write(run, tmp_path / "out")
    manifest = json.loads((bundle / "manifest.json").read_text())

    assert manifest["panoseti_meta_version"] == "1.0"
    assert manifest["source_run_dir"] == str(run.absolute())
    assert manifest["zarr_stores"] == [p.store for p in products_of(run)]
    assert manifest["created_utc"].endswith("+00:00")
    assert manifest["written_by"] == "panoseti_pipeline"
    assert manifest["products"][0] == {
        "name": f"{run.name}.dp_img16.bpp_2.module_1.zarr", "data_product": "img16",
        "module": 1, "level": "L1", "frames": 20,
        "first_time": "2024-07-25T04:34:46.123456789Z",
        "last_time": "2024-07-25T04:34:46.142456789Z",
        "first_time_ns": T0_NS, "last_time_ns": T0_NS + 19_000_000}
    assert set(manifest["files"]) == set(GENERATED)
    for rel, facts in manifest["files"].items():
        data = (bundle / rel).read_bytes()
        assert facts == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    assert run_bundle.verify_bundle(bundle) == []


def test_verify_finds_tampered_missing_and_foreign_files(run: Path, tmp_path: Path) -> None:
    bundle = write(run, tmp_path / "out")
    obs = bundle / "configs/obs_config.json"
    obs.write_bytes(obs.read_bytes().replace(b"Lick", b"Lock"))  # same size
    (bundle / "sentinels/run_complete").unlink()
    (bundle / "logs/extra.log").write_text("x")
    (bundle / "hk.pff").write_bytes(b"{}")

    problems = run_bundle.verify_bundle(bundle)
    assert len(problems) == 4, problems
    assert any(str(obs) in p and "sha256" in p for p in problems)
    assert any(str(bundle / "sentinels/run_complete") in p and "missing" in p for p in problems)
    assert any(str(bundle / "logs/extra.log") in p and "not listed" in p for p in problems)
    assert any(str(bundle / "hk.pff") in p and "2 bytes" in p for p in problems)
    (bundle / "manifest.json").unlink()
    assert run_bundle.verify_bundle(bundle) == [f"{bundle / 'manifest.json'}: missing, or "
                                                "not a manifest this pipeline wrote (no "
                                                "checksums to verify against)"]


def test_inputs_untouched_and_a_read_only_run_works(run: Path, tmp_path: Path) -> None:
    before = state(run)
    entries = [run, *run.iterdir()]
    for p in entries:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        read_only = state(run)
        bundle = write(run, tmp_path / "out")
        assert state(run) == read_only
    finally:
        for p in entries:
            p.chmod(0o755 if p.is_dir() else 0o644)
    assert state(run) == before
    assert run_bundle.verify_bundle(bundle) == []
    # the copies are outputs: the caller's umask, not the input's read-only bits
    assert (bundle / "configs/obs_config.json").stat().st_mode & stat.S_IWUSR


def test_rewrite_replaces_our_bundle_and_nothing_else(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    bundle = write(run, out)
    (run / "daq_config.json").write_text('{"changed": true}\n')
    assert write(run, out) == bundle
    assert json.loads((bundle / "configs/daq_config.json").read_text()) == {"changed": True}
    assert run_bundle.verify_bundle(bundle) == []
    housekeeping = bundle.name.replace(".pffd.panoseti-meta", ".housekeeping")
    assert sorted(p.name for p in out.iterdir()) == sorted([bundle.name, housekeeping])
    # no .partial, no .old

    # a file someone put into our bundle: refused, and everything stays
    (bundle / "logs/my_notes.txt").write_text("keep me")
    kept = tree(bundle)
    with pytest.raises(StoreError, match=r"logs/my_notes.txt.*did not write"):
        write(run, out)
    assert tree(bundle) == kept
    assert sorted(p.name for p in out.iterdir()) == sorted([bundle.name, housekeeping])


@pytest.mark.parametrize("foreign", ["directory", "pypff_bundle", "file", "symlink"])
def test_a_foreign_entry_of_the_bundle_name_is_refused(run: Path, tmp_path: Path,
                                                       foreign: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    final = out / f"{run.name}.panoseti-meta"
    if foreign == "directory":
        final.mkdir()
        (final / "notes.txt").write_text("keep me")
    elif foreign == "pypff_bundle":  # pypff's manifest: not ours to delete
        final.mkdir()
        (final / "manifest.json").write_text(json.dumps(
            {"panoseti_meta_version": "1.0", "zarr_stores": [], "files": {}}))
    elif foreign == "file":
        final.write_text("keep me")
    else:
        write(run, tmp_path / "elsewhere")
        final.symlink_to(tmp_path / "elsewhere" / final.name)
    before = tree(out)
    with pytest.raises(StoreError, match=re.escape(f"{final}: exists and is not a run bundle")):
        write(run, out)
    assert tree(out) == before
    assert not list(out.glob("*.partial"))


def test_bad_run_dir_and_bad_output_are_one_line_errors(run: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=re.escape(f"{tmp_path / 'nope'}: not a directory")):
        write(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "file").write_text("")
    with pytest.raises(StoreError, match="cannot create output directory"):
        write(run, tmp_path / "file" / "out")


def test_unparsable_json_is_a_notice_not_a_crash(run: Path, tmp_path: Path) -> None:
    (run / "broken.json").write_text('{"half": ')
    notices: list[str] = []
    configs = run_bundle.run_configs(run, notice=notices.append)
    assert "broken" not in configs and "obs_config" in configs
    (note,) = notices
    assert str(run / "broken.json") in note and "not valid JSON" in note
    bundle = write(run, tmp_path / "out")
    assert (bundle / "configs/broken.json").read_bytes() == b'{"half": '  # kept verbatim


def test_iso_times_keep_nanoseconds() -> None:
    assert run_bundle.iso_ns(T0_NS) == "2024-07-25T04:34:46.123456789Z"
    assert run_bundle.iso_ns(0) == "1970-01-01T00:00:00.000000000Z"
    assert run_bundle.iso_ns(None) is None


# ------------------------------------------------------------------------------ pypff


def test_pypff_reads_our_bundle_beside_its_stores(run: Path, tmp_path: Path) -> None:
    """open_zarr_run(out_dir): the stores, and the run's configs and logs from our bundle."""
    pypff_zarr = pytest.importorskip("pypff.zarr", reason=PYPFF_MISSING)
    from pypff.io2 import PanosetiRun

    (run / "broken.json").write_text("{")  # neither reader keeps it
    out = tmp_path / "out"
    stores = pypff_zarr.convert_run(PanosetiRun(run), out, write_sidecars=False)
    products = []
    for path in stores:
        store = pypff_zarr.PanosetiZarrStore(path)
        t = store.timestamps()
        products.append(ProductSummary(store=path.name, data_product=store.data_product,
                                       module=int(store.module), level="L0",
                                       frames=len(store), first_ns=int(t[0]),
                                       last_ns=int(t[-1])))
    run_bundle.write_bundle(run, out, products, notice=lambda _: None)

    zrun = pypff_zarr.open_zarr_run(out)
    assert zrun.list_products() == ["dp_img16.bpp_2.module_1", "dp_ph256.bpp_2.module_1"]
    expected = parsed_json_files(run, skip="broken.json")
    assert zrun.configs == expected
    assert run_bundle.run_configs(run, notice=lambda _: None) == expected
    hp_stdout = f"hp_stdout_{synthetic_obs.DAQ_NODE_IP}"
    assert zrun.get_log(hp_stdout) == (run / hp_stdout).read_text()
    manifest = json.loads(next(out.glob("*.panoseti-meta/manifest.json")).read_text())
    assert manifest["zarr_stores"] == [p.name for p in stores]
    assert manifest["products"][0]["frames"] == 20


def test_our_bundle_holds_what_pypff_bundles(run: Path, tmp_path: Path) -> None:
    """pypff's convert_run is the reference for which files go where."""
    pypff_zarr = pytest.importorskip("pypff.zarr", reason=PYPFF_MISSING)
    from pypff.io2 import PanosetiRun

    for name, text in EXTRAS.items():
        (run / name).write_text(text)
    pypff_zarr.convert_run(PanosetiRun(run), tmp_path / "pypff")
    theirs = tree(tmp_path / "pypff" / f"{run.name}.panoseti-meta")
    ours = copied(write(run, tmp_path / "ours"))
    del theirs["manifest.json"], ours["manifest.json"]
    assert ours == theirs


# --------------------------------------------------------------------- generated metadata


def test_generated_configs_are_valid_for_pypff(run: Path) -> None:
    pytest.importorskip("pypff.zarr", reason=PYPFF_MISSING)
    from pypff.io2 import PanosetiRun

    configs = PanosetiRun(run).configs  # a config failing pypff's models would be left out
    assert set(configs) == {p.stem for p in run.glob("*.json")}
    obs = parsed_json_files(run)["obs_config"]
    assert obs["domes"][0]["modules"][0]["ip_addr"] == synthetic_obs.module_ip(1) == \
        "192.168.0.4"
    assert synthetic_obs.module_ip(254) == "192.168.3.248"  # PANOSETI's example run
    for name in ("recording_ended", "collect_complete", "run_complete"):
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", (run / name).read_text())


QUABO_FIELDS = {"Computer_UTC", "BOARDLOC", *(f"HVMON{i}" for i in range(4)),
                *(f"HVIMON{i}" for i in range(4)), "RAWHVMON", "V12MON", "V18MON", "V33MON",
                "V37MON", "I10MON", "I18MON", "I33MON", "TEMP1", "TEMP2", "VCCINT", "VCCAUX",
                "UID", "SHUTTER_STATUS", "LIGHT_SENSOR_STATUS", "FWVER", "FWTIME",
                "STATUS_MSG", "AGG_STATUS_MSG", "AGG_STATUS_LEVEL",
                *(f"DETR{i}_CURR" for i in range(4))}


def test_generated_housekeeping_follows_the_format(tmp_path: Path) -> None:
    """PFF_FORMAT.md §8: one JSON object per record, keyed by its source, all values
    strings, Computer_UTC in each, records separated by a blank line, the last one cut."""
    hk = synthetic_obs.write_housekeeping(tmp_path, 30, modules=(1, 254))
    *records, cut = hk.read_text().split("\n\n")
    assert len(records) == 29 and cut and not cut.endswith("}")
    with pytest.raises(ValueError):
        json.loads(cut)
    sources = []
    for text in records:
        assert "\n" not in text
        (source, fields), = json.loads(text).items()
        sources.append(source)
        assert all(isinstance(v, str) for v in fields.values()), source
        float(fields["Computer_UTC"])
        if source.startswith("QUABO_"):
            assert QUABO_FIELDS <= set(fields) and fields["BOARDLOC"] == source[6:]
            assert re.fullmatch(r"0x[0-9a-f]{16}", fields["UID"])
        elif source == "WRSWITCH":
            ports = [f"Port{p:2d}_LINK" for p in range(1, 19)]
            assert ports[0] == "Port 1_LINK" and ports[-1] == "Port18_LINK"
            assert set(fields) == {"Computer_UTC", *ports, "SOFTPLL"}
        elif source in ("GPSPRIM", "GPSSUPP"):
            assert {"GPSTIME", "Computer_UTC"} <= set(fields)
        else:
            assert source == "WPS" and set(fields) == {"Computer_UTC", "POWER"}
    boards = [f"QUABO_{b}" for b in (4, 5, 6, 7, 1016, 1017, 1018, 1019)]
    period = [*boards, "GPSPRIM", "GPSSUPP", "WRSWITCH", "WPS"]
    assert sources == (period * 3)[:29]
    times = [float(json.loads(t)[s]["Computer_UTC"]) for t, s in zip(records, sources, strict=True)]
    assert times == sorted(times)


def test_generator_is_deterministic(tmp_path: Path) -> None:
    a = synthetic_obs.make_observation(tmp_path / "a", frames_per_file=5, files_per_stream=1)
    b = synthetic_obs.make_observation(tmp_path / "b", frames_per_file=5, files_per_stream=1)
    c = synthetic_obs.make_observation(tmp_path / "c", frames_per_file=5, files_per_stream=1,
                                       seed=1)
    assert tree(a) == tree(b)
    assert tree(a)["hk.pff"] != tree(c)["hk.pff"]
    assert os.listdir(a) and sorted(os.listdir(a)) == sorted(os.listdir(c))


def test_links_out_of_the_run_are_not_followed_and_copies_keep_their_modes(
        run: Path, tmp_path: Path) -> None:
    """Defect: ``notes.log -> /etc/shadow`` was copied into the bundle, and a 0600
    ``credentials.json`` was copied as 0644 (and its contents went into every store's
    ``run_configs``)."""
    secret = tmp_path / "shadow"
    secret.write_text("root:x:\n")
    secret.chmod(0o600)
    (run / "notes.log").symlink_to(secret)
    (run / "inside.log").symlink_to(run / "daq_config.json")  # a link within the run
    credentials = run / "credentials.json"
    credentials.write_text('{"password": "hunter2"}')
    credentials.chmod(0o600)
    (run / "daq_config.json").chmod(0o640)
    notices: list[str] = []
    bundle = write(run, tmp_path / "out", notices)
    files = json.loads((bundle / "manifest.json").read_text())["files"]
    assert "logs/notes.log" not in files and not (bundle / "logs" / "notes.log").exists()
    assert "root:x:" not in "".join(p.read_text(errors="replace")
                                    for p in bundle.rglob("*") if p.is_file())
    assert any(f"{run / 'notes.log'}: a link that leaves the run directory" in n
               for n in notices)
    assert (bundle / "logs" / "inside.log").read_bytes() == (run / "daq_config.json").read_bytes()
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(bundle / "configs" / "credentials.json") == 0o600 & ~_umask()
    assert mode(bundle / "configs" / "daq_config.json") == 0o660 & ~_umask()
    assert mode(bundle / "configs" / "obs_config.json") == 0o666 & ~_umask()
    assert run_bundle.verify_bundle(bundle) == []
    # what the stores carry: never the contents of a file fewer users may read
    notices.clear()
    configs = run_bundle.run_configs(run, notice=notices.append)
    assert "credentials" not in configs and "daq_config" not in configs
    assert "obs_config" in configs
    assert sum("left out of run_configs" in n for n in notices) == 2


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
