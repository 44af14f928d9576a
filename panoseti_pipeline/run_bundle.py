"""The run bundle: ``<run>.panoseti-meta/``, a run's own metadata kept beside its products.

A PANOSETI run directory (``obs_<site>.start_<t>Z.runtype_<type>.pffd/``) holds more than
PFF data: the configurations the DAQ ran with, its logs, the sentinels that say how far the
run got, and ``hk.pff`` (housekeeping). The products alone would lose them, so each run's
output directory gets the bundle PANOSETI's own library ``pypff`` (>= 1.0.4) defines and
reads (``pypff.zarr.open_zarr_run(out_dir).configs`` reads its ``configs/*.json``):

=====================  ======================================================
bundle path            copied from the run directory (top level, files only)
=====================  ======================================================
``configs/``           ``*.json`` (``dp_manifest*.json`` included), ``*.toml``
``logs/``              ``*.log``, ``*.txt``, ``hp_stdout_*``
``manifests/``         ``dp_manifest*``
``sentinels/``         ``collect_complete``, ``run_complete``, ``recording_ended``
``hk.pff``             ``hk.pff``
``manifest.json``      written here (below)
=====================  ======================================================

These are pypff's rules, so a bundle of ours and one of ``pypff.zarr.convert_run`` hold the
same files, and pypff's ``list_sidecars()`` lists just those. What is derived from them
goes beside the bundle: ``<run>.housekeeping/`` holds ``<run>.hk.zarr``, written from
``hk.pff`` (:mod:`panoseti_pipeline.housekeeping`), and ``<run>.hk.png``, its quicklook
(temperatures and HV of every quabo board); pypff's reader sees neither (it keys only the
top-level ``*.zarr`` as products). Files are copied byte for
byte, keeping their modification time; the copies get the caller's umask like every other
output (DESIGN.md §8), narrowed by the input's mode bits: a copy is never more readable
than its file. A link that leaves the run directory is never followed. Inputs are only
read: a read-only run directory works.

``manifest.json`` has pypff's keys (``panoseti_meta_version``, ``created_utc``,
``source_run_dir``, ``zarr_stores``) and ours: ``written_by`` (so that a re-run replaces
only a bundle this pipeline wrote), ``products`` (per store: level, frames, first and last
frame time) and ``files`` (sha256 and size of every copied file, checked by
:func:`verify_bundle`) and ``housekeeping`` (the directory beside the bundle, the store
and quicklook in it, records read, a cut last record). pypff's reader does not read the
manifest, so the extra keys cost it nothing.

The bundle is built under ``<bundle>.<id>.partial`` in the output directory and renamed into
place when complete, as the products are: a bundle under its final name is whole.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import fnmatch
import functools
import hashlib
import json
import os
import shutil
import stat
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from panoseti_pipeline.errors import InputError, PipelineError, StoreError
from panoseti_pipeline.pff import HOUSEKEEPING_NAME, NAT
from panoseti_pipeline.store import publish
from panoseti_pipeline.store.facts import read_root
from panoseti_pipeline.store.safe_write import new_file_mode

Notice = Callable[[str], None]

BUNDLE_SUFFIX = ".panoseti-meta"
MANIFEST_NAME = "manifest.json"
META_VERSION = "1.0"  # pypff 1.0.4's panoseti_meta_version
WRITTEN_BY = "panoseti_pipeline"
SENTINELS = ("collect_complete", "run_complete", "recording_ended")
# (bundle sub-directory, name patterns), pypff's table; "" is the bundle's top level
RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("configs", ("*.json", "*.toml")),
    ("logs", ("*.log", "*.txt", "hp_stdout_*")),
    ("manifests", ("dp_manifest*",)),
    ("sentinels", SENTINELS),
    ("", (HOUSEKEEPING_NAME,)),
)
SUBDIRS = tuple(sub for sub, _ in RULES if sub)  # created even when empty, as pypff does


@dataclasses.dataclass(frozen=True)
class ProductSummary:
    """One product store of the run, as the bundle's manifest lists it.

    ``store`` is the store's directory name: the bundle sits beside its stores. Times are
    int64 nanoseconds since the Unix epoch (``None`` when the store has no timed frame).
    """

    store: str
    data_product: str
    module: int
    level: str
    frames: int
    first_ns: int | None
    last_ns: int | None

    def to_manifest(self) -> dict[str, Any]:
        return {"name": self.store, "data_product": self.data_product, "module": self.module,
                "level": self.level, "frames": self.frames,
                "first_time": iso_ns(self.first_ns), "last_time": iso_ns(self.last_ns),
                "first_time_ns": self.first_ns, "last_time_ns": self.last_ns}


def summarize_store(path: str | os.PathLike) -> ProductSummary:
    """The manifest's facts of a published product store (its attributes and first and
    last ``unix_t_ns``; a frame without time, NaT, gives ``None``)."""
    import zarr

    group = zarr.open_group(str(path), mode="r")
    times = group["unix_t_ns"]
    n = times.shape[0]
    first, last = (int(times[0]), int(times[n - 1])) if n else (NAT, NAT)
    return ProductSummary(Path(path).name, str(group.attrs["data_product"]),
                          int(group.attrs["module"]), str(group.attrs["processing_level"]),
                          int(group.attrs["total_frames"]), None if first == NAT else first,
                          None if last == NAT else last)


def iso_ns(t_ns: int | None) -> str | None:
    """ISO 8601 UTC with all nine digits of nanoseconds (datetime stops at microseconds)."""
    if t_ns is None:
        return None
    sec, ns = divmod(t_ns, 1_000_000_000)
    return f"{dt.datetime.fromtimestamp(sec, dt.timezone.utc):%Y-%m-%dT%H:%M:%S}.{ns:09d}Z"


def bundle_name(source: str | os.PathLike) -> str:
    """``<run dir name>.panoseti-meta``: pypff's name, ``.pffd`` included (of a run
    directory, or of a bundle already written)."""
    name = Path(os.path.abspath(source)).name
    return name if name.endswith(BUNDLE_SUFFIX) else name + BUNDLE_SUFFIX


def bundle_sources(source: str | os.PathLike, notice: Notice
                   ) -> tuple[dict[str, Path], Path]:
    """What a bundle copies from ``source`` (bundle-relative path -> file), and the run
    directory it comes from. ``source`` is the ``.pffd`` run directory, or a bundle of
    ours beside the L0 stores ``run.sh --steps 1`` made (``--steps 2`` lays its L1 out
    like ``--steps 1,2``, bundle included); such a bundle must verify."""
    source = Path(os.path.abspath(source))
    if not source.is_dir():
        raise InputError(f"{source}: not a directory (expected an obs_*.pffd run directory "
                         f"or a *{BUNDLE_SUFFIX} bundle)")
    if source.name.endswith(BUNDLE_SUFFIX):
        problems = verify_bundle(source)
        if problems:
            raise InputError(f"{source}: the run bundle does not verify ({problems[0]})")
        manifest = _read_manifest(source)
        assert manifest is not None  # it verified
        return ({rel: source / rel for rel in manifest["files"]},
                Path(manifest["source_run_dir"]))
    try:
        files = bundle_files(source)
        _notice_left_out(source, set(files.values()), notice)
    except OSError as err:
        raise InputError(f"{source}: cannot list the run directory ({err.strerror})") from None
    return files, source


def bundle_files(run_dir: str | os.PathLike) -> dict[str, Path]:
    """What the bundle holds: bundle-relative path -> file of the run directory.

    Only regular files at the run directory's top level, by :data:`RULES`; a symlink
    counts as the file it points to if that file is inside the run directory
    (:func:`links_leaving` lists the others, never followed); one file may go to two
    places (``dp_manifest.json`` is a config and a manifest).
    """
    leaving = set(links_leaving(run_dir))
    files: dict[str, Path] = {}
    for entry in sorted(Path(run_dir).iterdir()):
        if entry in leaving or not entry.is_file():
            continue
        for sub, patterns in RULES:
            if any(fnmatch.fnmatchcase(entry.name, p) for p in patterns):
                files[f"{sub}/{entry.name}" if sub else entry.name] = entry
    return dict(sorted(files.items()))


def links_leaving(run_dir: str | os.PathLike) -> list[Path]:
    """Entries of the run directory that are links to something outside it (``notes.log
    -> /etc/shadow``): what they point to is not the run's, so it is never copied."""
    root = Path(os.path.realpath(run_dir))
    return [entry for entry in sorted(Path(run_dir).iterdir()) if entry.is_symlink()
            and not Path(os.path.realpath(entry)).is_relative_to(root)]


def run_configs(run_dir: str | os.PathLike, *, notice: Notice) -> dict[str, Any]:
    """The run's JSON configs parsed as they are, keyed by file stem.

    The same files, parsed the same way (raw ``json``, no schema) as pypff's reader parses
    the bundle's ``configs/``, so the ``run_configs`` attribute of a store and
    ``open_zarr_run(...).configs`` agree. A file that is not valid JSON is left out with a
    notice (it is still copied into the bundle), as the reader leaves it out; so is a file
    fewer users may read than may read the stores (a 0600 ``credentials.json``): its
    contents never become more readable than the file.
    """
    configs: dict[str, Any] = {}
    readers = new_file_mode() & 0o444
    for rel, path in bundle_files(run_dir).items():
        if not (rel.startswith("configs/") and rel.endswith(".json")):
            continue
        try:
            mode = path.stat().st_mode
            text = path.read_bytes()
        except OSError as err:
            raise InputError(f"{path}: cannot read the run config ({err.strerror})") from None
        if mode & readers != readers:
            notice(f"{path}: readable by fewer users (mode {stat.S_IMODE(mode):04o}) than "
                   "the stores; left out of run_configs, copied into the bundle with its mode")
            continue
        try:
            configs[path.stem] = json.loads(text)
        except ValueError as err:
            notice(f"{path}: not valid JSON ({err}); left out of run_configs, copied as it is")
    return configs


def write_bundle(source: str | os.PathLike, out_dir: str | os.PathLike,
                 products: Sequence[ProductSummary], *, notice: Notice,
                 hk_level: str | os.PathLike | None = None, quicklook: bool = True) -> Path:
    """Write ``<out_dir>/<run dir name>.panoseti-meta/`` for ``products``; return its path.

    ``source`` is the run directory, or a bundle of that run (:func:`bundle_sources`).
    Built under a ``.partial`` name in ``out_dir`` and renamed into place when complete. An
    existing bundle there is replaced only if this pipeline wrote it and it holds nothing
    else; anything else under that name is refused, never removed. Entries of the run
    directory that are neither PFF data nor bundled (sub-directories, ``*.jsonl``, ...) are
    named in one notice, so that a user knows what the bundle does not keep. With
    ``hk_level`` (the team's layout: the run's ``L0/``), the housekeeping stores go there
    as ``hk.<hashset>.zarr`` and ``<run>.housekeeping/`` holds the quicklook only. The
    housekeeping gets its PNG only with ``quicklook`` (``run.sh --no-quicklook``: no PNG).
    """
    out_dir = Path(out_dir)
    files, run_dir = bundle_sources(source, notice)
    final = out_dir / bundle_name(source)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StoreError(f"{out_dir}: cannot create output directory ({err.strerror})") from None
    for message in publish.clear_stale(final):
        notice(message)
    try:
        with publish.staged(final, functools.partial(_replace_problem, final),
                            "the run bundle") as tmp:
            tmp.mkdir()
            for sub in SUBDIRS:
                (tmp / sub).mkdir()
            manifest = {
                "panoseti_meta_version": META_VERSION,
                "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(),
                "source_run_dir": str(run_dir),
                "zarr_stores": list(dict.fromkeys(p.store for p in products)),
                "written_by": WRITTEN_BY,
                "products": [p.to_manifest() for p in products],
                "files": {rel: _copy(src, tmp / rel) for rel, src in files.items()},
            }
            if HOUSEKEEPING_NAME in files:
                manifest["housekeeping"] = _housekeeping(tmp / HOUSEKEEPING_NAME, out_dir,
                                                         run_dir, files[HOUSEKEEPING_NAME],
                                                         notice, hk_level, quicklook)
            (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n",
                                             encoding="utf-8")
    except OSError as err:
        if isinstance(err, PipelineError):
            raise
        raise StoreError(f"{final}: cannot write the run bundle ({err.strerror or err}); "
                         "nothing was published") from err
    return final


def verify_bundle(path: str | os.PathLike) -> list[str]:
    """Problems of a bundle against its ``manifest.json`` (an empty list: it is intact).

    Each problem is one line naming the file: missing, a size or sha256 that differs from
    the manifest, or an entry the manifest does not list.
    """
    path = Path(path)
    manifest = _read_manifest(path)
    if manifest is None:
        return [f"{path / MANIFEST_NAME}: missing, or not a manifest this pipeline wrote "
                "(no checksums to verify against)"]
    problems = []
    for rel, want in manifest["files"].items():
        file = path / rel
        if not file.is_file():
            problems.append(f"{file}: missing")
            continue
        size, digest = _file_facts(file)
        if size != want.get("size"):
            problems.append(f"{file}: {size} bytes, the manifest says {want.get('size')}")
        elif digest != want.get("sha256"):
            problems.append(f"{file}: sha256 {digest} differs from the manifest's")
    problems += [f"{path / name}: missing" for name in sorted(_generated(manifest))
                 if not (path / name).exists()]
    problems += [f"{path / rel}: not listed in {MANIFEST_NAME}"
                 for rel in _unlisted(path, manifest["files"], _generated(manifest))]
    return problems


def _housekeeping(hk_copy: Path, out_dir: Path, run_dir: Path, hk_file: Path,
                  notice: Notice, hk_level: str | os.PathLike | None,
                  quicklook: bool) -> dict[str, Any]:
    """``<run>.housekeeping/`` beside the bundle, with ``<run>.hk.zarr`` and (with
    ``quicklook``) ``<run>.hk.png`` written from ``hk_copy`` (the bundle's copy of
    ``hk_file``, the run's hk.pff); built under a ``.partial`` name and renamed into
    place, as the bundle. With ``hk_level``, the stores are the team's
    ``hk.<hashset>.zarr`` there instead (their paths relative to ``out_dir`` in
    ``hk_stores``)."""
    from panoseti_pipeline.housekeeping import convert_hk, hk_names

    directory, store, png = hk_names(run_dir)
    final = out_dir / directory
    for message in publish.clear_stale(final):
        notice(message)
    try:
        with publish.staged(final, functools.partial(_hk_replace_problem, final, store, png),
                            "the housekeeping") as tmp:
            tmp.mkdir()
            facts = convert_hk(hk_copy, None if hk_level else tmp / store,
                               tmp / png if quicklook else None, hk_level=hk_level,
                               notice=notice)
            facts["hk_stores"] = [os.path.relpath(p, out_dir) for p in facts["hk_stores"]]
    except ValueError as err:  # hk.pff is input: a surprise in it must not cost the bundle
        notice(f"{hk_file}: no housekeeping store written ({err}); "
               "hk.pff is in the bundle as it is")
        return {"error": str(err)}
    renamed = list(facts["renamed"].items())
    store = "the hk.<hashset>.zarr stores" if hk_level else store
    if renamed:
        shown = ", ".join(f"{name!r} as {node}" for node, name in renamed[:3])
        notice(f"{hk_file}: {len(renamed)} source or field names stored "
               f"under another name (Zarr reserves them, or two would be one): {shown}"
               f"{', ...' if len(renamed) > 3 else ''} (listed in the attributes of {store})")
    if facts["unreadable_records"]:
        notice(f"{hk_file}: {facts['unreadable_records']} records are not "
               f"housekeeping records, left out of {store} (listed in its attributes)")
    return {"directory": directory, **facts}


def _hk_replace_problem(final: Path, store: str, png: str) -> str | None:
    """Why ``final`` may not be replaced by a new housekeeping directory, or None: only
    one this pipeline wrote (its store and PNG, nothing else) is replaced."""
    if not (final.exists() or final.is_symlink()):
        return None
    try:
        ours = (final.is_dir() and not final.is_symlink()
                and {p.name for p in final.iterdir()} <= {store, png}
                and read_root(final / store)[1].get("attributes", {}).get("content")
                == "housekeeping")
    except (OSError, InputError):
        ours = False
    return None if ours else (
        f"{final}: exists and is not the housekeeping this pipeline writes; refusing to "
        "replace it (move it away or choose another output)")


def _generated(manifest: dict[str, Any]) -> set[str]:
    """Top-level bundle entries written here rather than copied: the housekeeping of a
    bundle written before it moved beside the bundle (its manifest names no directory)."""
    hk = manifest.get("housekeeping")
    if not isinstance(hk, dict) or "directory" in hk:
        return set()
    return {name for name in (hk.get("store"), hk.get("quicklook")) if name}


def _notice_left_out(run_dir: Path, bundled: set[Path], notice: Notice) -> None:
    leaving = links_leaving(run_dir)
    for link in leaving:
        notice(f"{link}: a link that leaves the run directory (to {os.readlink(link)}); not "
               "followed, not in the run bundle")
    left = [entry.name + ("/" if entry.is_dir() else "") for entry in sorted(run_dir.iterdir())
            if entry not in bundled and entry not in leaving
            and not (entry.suffix == ".pff" and entry.is_file())]  # data: the products
    if left:
        shown = ", ".join(left[:3]) + (", ..." if len(left) > 3 else "")
        notice(f"{run_dir}: {len(left)} entries neither PFF data nor run metadata, not in "
               f"the run bundle ({shown})")


def _copy(src: Path, dst: Path) -> dict[str, Any]:
    """Copy ``src`` byte for byte (keeping its mtime), never more readable than it is: a
    class of users (owner, group, others) that may not read ``src`` gets no access to the
    copy, the others what the umask gives. Return the copy's size and sha256."""
    try:
        with open(src, "rb") as fin:
            st = os.fstat(fin.fileno())
            mode = 0o666
            for shift in (6, 3, 0):
                if not st.st_mode & (0o4 << shift):
                    mode &= ~(0o6 << shift)
            fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
            with os.fdopen(fd, "wb") as fout:
                shutil.copyfileobj(fin, fout)
    except OSError as err:
        if err.filename == str(src):  # reading, not writing
            raise InputError(f"{src}: cannot read ({err.strerror})") from None
        raise
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
    size, digest = _file_facts(dst)
    return {"sha256": digest, "size": size}


def _file_facts(path: Path) -> tuple[int, str]:
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        return f.tell(), digest


def _read_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest of a bundle of ours, or None (absent, unreadable, or not ours)."""
    try:
        manifest = json.loads((path / MANIFEST_NAME).read_bytes())
    except (OSError, ValueError):
        return None
    if (not isinstance(manifest, dict) or manifest.get("written_by") != WRITTEN_BY
            or not isinstance(manifest.get("files"), dict)):
        return None
    return manifest


def _unlisted(path: Path, listed: Iterable[str], generated: set[str]) -> list[str]:
    """Bundle-relative entries that are neither listed files nor the bundle's own layout
    (``generated``: top-level entries written here, whole trees)."""
    known = {*listed, MANIFEST_NAME, *SUBDIRS, *generated}
    found = []
    for root, dirs, names in os.walk(path):
        rel_root = Path(root).relative_to(path)
        if rel_root.parts and rel_root.parts[0] in generated:
            continue
        found += [(rel_root / n).as_posix() for n in names]
        found += [(rel_root / d).as_posix() + "/" for d in dirs
                  if (rel_root / d).as_posix() not in known]
    return sorted(rel for rel in found if rel not in known)


def _replace_problem(final: Path) -> str | None:
    """Why ``final`` may not be replaced by a new bundle, or None.

    Only a bundle this pipeline wrote, holding nothing it did not write, is replaced: any
    other directory or file of that name is someone's data.
    """
    if not (final.exists() or final.is_symlink()):
        return None
    manifest = None if final.is_symlink() else _read_manifest(final)
    if manifest is None:
        return (f"{final}: exists and is not a run bundle written by this pipeline; "
                "refusing to replace it (move it away or choose another output)")
    extra = _unlisted(final, manifest["files"], _generated(manifest))
    if extra:
        return (f"{final}: holds {extra[0]}, which this pipeline did not write; "
                "refusing to replace the bundle (move that file away)")
    return None
