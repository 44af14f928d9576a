"""The catalog: one SQLite table of every product under an output root, updated by each run.

    python3 -m panoseti_pipeline catalog OUTPUT_ROOT [--module 1] [--dp img16]
        [--between 2025-08-02T05:00 2025-08-02T06:00] [--level L1] [--status ok] [--json]
    python3 -m panoseti_pipeline catalog OUTPUT_ROOT --rebuild

``<OUTPUT_ROOT>/catalog.sqlite`` (standard library ``sqlite3``) has one row per product
store, keyed by its path (relative to the root): run, site, module, data product, level,
first and last frame time, frames, flag counts, status, sha256 of its ``zarr.json``
(changes whenever the store is rewritten), bytes on disk, created (the store's own time)
and cataloged (when the row was written). Every fact, the status included, describes the
store on disk (``ok``, or ``degraded``: step 1 skipped corrupt bytes of its input), never
what a run did: a run that skipped a product, or failed to replace it, leaves the row of
the product that is there. ``run.sh`` updates it after its summary (``driver
finish``): its products (L1; the L0 with ``--steps 1``; kept L0 stores too) replace
rows of the same path, so a rerun leaves one row per product. ``--rebuild`` scans the root
for published stores (their attributes carry every fact) and rewrites the table: the same
rows.

Two hosts finishing runs into one root at once: each update gathers its facts first, then
writes them in one ``BEGIN IMMEDIATE`` transaction (SQLite's write lock, taken at the
start), and a connection waits up to :data:`BUSY_TIMEOUT_S` for the other's to end. The
rollback journal is kept (no WAL, which needs shared memory a network file system lacks).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sqlite3
import sys
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from panoseti_pipeline.errors import EXIT_OK, ConfigError, InputError, StoreError, run_main
from panoseti_pipeline.housekeeping import HK_DIR_SUFFIX
from panoseti_pipeline.run_bundle import BUNDLE_SUFFIX, iso_ns
from panoseti_pipeline.store.facts import StoreFacts, store_facts
from panoseti_pipeline.store.publish import PARTIAL_SUFFIX, is_published, is_transient, utc_now

CATALOG_NAME = "catalog.sqlite"
BUSY_TIMEOUT_S = 120.0
SCHEMA_VERSION = 1
LEVELS = ("L0", "L1")
COLUMNS = ("path", "run", "site", "module", "data_product", "level", "first_time",
           "last_time", "first_ns", "last_ns", "frames", "flag_counts", "status",
           "zarr_json_sha256", "bytes", "created", "cataloged")
SCHEMA = """CREATE TABLE IF NOT EXISTS products (
    path TEXT PRIMARY KEY,      -- the store, relative to the output root
    run TEXT, site TEXT, module INTEGER, data_product TEXT, level TEXT,
    first_time TEXT, last_time TEXT,  -- ISO 8601 UTC with ns
    first_ns INTEGER, last_ns INTEGER, frames INTEGER,
    flag_counts TEXT,           -- JSON: flag name -> frames
    status TEXT,                -- of the store: ok, degraded (corrupt input bytes skipped)
    zarr_json_sha256 TEXT, bytes INTEGER,
    created TEXT, cataloged TEXT)"""


def catalog_path(root: str | os.PathLike) -> Path:
    """The catalog of an output root (a path ending in .sqlite is the catalog itself)."""
    root = Path(root)
    return root if root.suffix == ".sqlite" else root / CATALOG_NAME


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[sqlite3.Connection]:
    """One write transaction on the catalog file ``path``, started with the write lock
    (BEGIN IMMEDIATE); an SQLite failure (locked longer than the busy timeout, read-only,
    not a database) is a :class:`StoreError` naming the catalog."""
    try:
        con = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    except sqlite3.Error as err:
        raise StoreError(f"{path}: cannot open the catalog ({err})") from None
    try:
        con.execute("BEGIN IMMEDIATE")
        con.execute(SCHEMA)
        con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        yield con
        con.execute("COMMIT")
    except sqlite3.Error as err:
        if con.in_transaction:
            con.execute("ROLLBACK")
        raise StoreError(f"{path}: cannot update the catalog ({err}); its rows are as "
                         "before (`python3 -m panoseti_pipeline catalog "
                         f"{path.parent} --rebuild` rewrites it)") from None
    except BaseException:
        if con.in_transaction:
            con.execute("ROLLBACK")
        raise
    finally:
        con.close()


def row(facts: StoreFacts, root: Path, cataloged: str) -> dict[str, Any]:
    """A product's catalog row (path relative to ``root`` when it lies below it)."""
    return {"path": row_path(facts.path, root),
            "run": facts.run, "site": facts.site, "module": facts.module,
            "data_product": facts.data_product, "level": facts.level,
            "first_time": iso_ns(facts.first_ns), "last_time": iso_ns(facts.last_ns),
            "first_ns": facts.first_ns, "last_ns": facts.last_ns, "frames": facts.frames,
            "flag_counts": json.dumps(facts.flag_counts), "status": facts.status,
            "zarr_json_sha256": facts.zarr_json_sha256, "bytes": facts.bytes,
            "created": facts.created, "cataloged": cataloged}


def update(root: str | os.PathLike, products: Iterable[str | os.PathLike]) -> int:
    """Catalog the stores at these paths; rows of the same path are replaced, a path with
    no published store loses its row. Returns the rows written."""
    root, now = Path(root), utc_now()
    rows, gone = [], []
    for path in products:
        if any(is_published(path, level) for level in LEVELS):
            rows.append(row(store_facts(path), root, now))
        else:
            gone.append(row_path(path, root))
    with _writing(catalog_path(root)) as con:
        con.executemany("DELETE FROM products WHERE path = ?", [(p,) for p in gone])
        _insert(con, rows)
    return len(rows)


def row_path(path: str | os.PathLike, root: Path) -> str:
    """A store's key: its path relative to the output root, or absolute outside it."""
    rel = os.path.relpath(Path(path).absolute(), root.absolute())
    return Path(path).absolute().as_posix() if rel.startswith("..") else Path(rel).as_posix()


def _insert(con: sqlite3.Connection, rows: list[dict[str, Any]]) -> None:
    names = ", ".join(COLUMNS)
    marks = ", ".join(f":{c}" for c in COLUMNS)
    con.executemany(f"INSERT OR REPLACE INTO products ({names}) VALUES ({marks})", rows)


def published_stores(root: str | os.PathLike) -> list[Path]:
    """Every published L0/L1 store below ``root`` (not inside stores, bundles, partials,
    housekeeping directories), but a transient L0 a stopped run left (not a product: the
    next run removes it)."""
    found = []
    for top, dirs, _files in os.walk(root):
        keep = []
        for d in sorted(dirs):
            path = Path(top, d)
            if d.endswith(".zarr") and any(is_published(path, lv) for lv in LEVELS):
                if not is_transient(path):
                    found.append(path)
            elif not d.endswith((".zarr", PARTIAL_SUFFIX, BUNDLE_SUFFIX, HK_DIR_SUFFIX)):
                keep.append(d)
        dirs[:] = keep
    return found


def rebuild(root: str | os.PathLike) -> int:
    """Rewrite the catalog from the published stores found below ``root``.

    The new catalog is written beside the old one and renamed over it: a catalog that
    is damaged ("file is not a database") or a link is replaced, never read or written.
    """
    root, now = Path(root), utc_now()
    if not root.is_dir():
        raise InputError(f"{root}: not a directory (--rebuild scans the output directory "
                         "given to run.sh)")
    rows = [row(store_facts(p), root, now) for p in published_stores(root)]
    path = catalog_path(root)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with _writing(tmp) as con:
            _insert(con, rows)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return len(rows)


def update_from_state(state: dict[str, Any]) -> tuple[Path, int]:
    """After a run: catalog its products (L1, or L0 with ``--steps 1``) and the L0 stores
    kept beside them (``--keep-l0``, or kept by an earlier run; a transient L0 is gone)."""
    root = Path(state["output_dir"])
    products = [job["l1"] or job["l0"] for job in state["jobs"]]
    products += [job["l0"] for job in state["jobs"] if job["l1"] and job["l0"]
                 and state["steps"] == [1, 2] and is_published(job["l0"], "L0")]
    return catalog_path(root), update(root, products)


def time_bounds(text: str) -> tuple[int, int]:
    """The first and last ns a UTC time string covers, as xarray's ``sel`` reads it.

    pandas (so ``ds.sel(time=slice(a, b))``) takes a partial time as its whole period:
    ``04:35`` is 04:35:00 to 04:35:59.999999999, ``04:34:46.2`` a whole millisecond.
    ``pandas.Period`` has exactly those bounds. A trailing Z or +00:00 is allowed.
    """
    import pandas as pd

    t = text.strip().removesuffix("Z").removesuffix("+00:00")
    try:
        period = pd.Period(t)
    except ValueError:
        raise ConfigError(f"between {text!r}: not an ISO 8601 time "
                          "(e.g. 2025-08-02T05:00)") from None
    return period.start_time.value, period.end_time.value


def interval(between: tuple[str, str]) -> tuple[int, int]:
    """``(start, end)`` -> the ns interval ``ds.sel(time=slice(start, end))`` selects."""
    return time_bounds(between[0])[0], time_bounds(between[1])[1]


def query(root: str | os.PathLike, *, module: int | None = None, dp: str | None = None,
          between: tuple[str, str] | None = None, level: str | None = None,
          status: str | None = None, run: str | None = None) -> list[dict[str, Any]]:
    """Catalog rows matching every filter given, by run, module, product; ``path`` made
    absolute. ``between``: products whose frames overlap that UTC interval."""
    path = catalog_path(root)
    if not path.is_file():
        raise InputError(f"{path}: no catalog (run.sh writes one in its output directory; "
                         "`catalog ROOT --rebuild` makes one from the stores there)")
    where, args = [], []
    for column, value in (("module", module), ("data_product", dp), ("level", level),
                          ("status", status), ("run", run)):
        if value is not None:
            where.append(f"{column} = ?")
            args.append(value)
    if between is not None:
        start, end = interval(between)
        where.append("first_ns <= ? AND last_ns >= ?")
        args += [end, start]
    sql = (f"SELECT {', '.join(COLUMNS)} FROM products"
           + (f" WHERE {' AND '.join(where)}" if where else "")
           + " ORDER BY run, module, data_product, level, path")
    con = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True,
                          timeout=BUSY_TIMEOUT_S)
    try:
        found = [dict(zip(COLUMNS, r, strict=True)) for r in con.execute(sql, args)]
    except sqlite3.DatabaseError as err:
        raise InputError(f"{path}: not a catalog this pipeline wrote ({err})") from None
    finally:
        con.close()
    base = path.parent
    for r in found:
        r["flag_counts"] = json.loads(r["flag_counts"] or "{}")
        r["path"] = str(base / r["path"]) if not r["path"].startswith("/") else r["path"]
    return found


def table(rows: list[dict[str, Any]]) -> list[str]:
    """The rows for people: level, product, span, frames, flagged frames, status, path."""
    head = ["level", "site", "module", "dp", "first (UTC)", "last (UTC)", "frames", "flags",
            "status", "store"]
    lines = [[r["level"], r["site"] or "-", "-" if r["module"] is None else str(r["module"]),
              r["data_product"],
              _short(r["first_time"]), _short(r["last_time"]), str(r["frames"]),
              ",".join(f"{k}={v}" for k, v in r["flag_counts"].items() if v) or "-",
              r["status"], r["path"]] for r in rows]
    widths = [max(len(x[i]) for x in [head, *lines]) for i in range(len(head))]
    return ["  ".join(c.ljust(w) for c, w in zip(x, widths, strict=True)).rstrip()
            for x in [head, ["-" * w for w in widths], *lines]]


def _short(iso: str | None) -> str:
    """ISO with ns -> to the millisecond, for the table."""
    return iso[:23] if iso else "-"


def main(argv: Sequence[str] | None = None,
         prog: str = "python3 -m panoseti_pipeline catalog") -> int:
    """List (or rebuild) the catalog of an output root."""
    from panoseti_pipeline.version import add_version_option

    parser = argparse.ArgumentParser(prog=prog, description=main.__doc__)
    add_version_option(parser)
    parser.add_argument("root", metavar="OUTPUT_ROOT",
                        help="the output directory given to run.sh (or its catalog.sqlite)")
    parser.add_argument("--module", type=int, help="module number, e.g. 1")
    parser.add_argument("--dp", help="data product: img16, img8, ph256, ph1024")
    parser.add_argument("--level", choices=LEVELS, help="processing level")
    parser.add_argument("--status", choices=("ok", "degraded"),
                        help="degraded: step 1 skipped corrupt bytes of the input")
    parser.add_argument("--run", help="observation run name (obs_<site>.start_<t>Z.runtype_<t>)")
    parser.add_argument("--between", nargs=2, metavar=("START", "END"),
                        help="products with frames in this UTC interval (ISO 8601)")
    parser.add_argument("--json", action="store_true", help="the rows as a JSON list")
    parser.add_argument("--rebuild", action="store_true",
                        help="rewrite the catalog from the stores found under OUTPUT_ROOT")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)

    def body() -> int:
        if args.rebuild:
            n = rebuild(args.root)
            print(f"{catalog_path(args.root)}: {n} products", file=sys.stderr)
        rows = query(args.root, module=args.module, dp=args.dp, level=args.level,
                     status=args.status, run=args.run,
                     between=tuple(args.between) if args.between else None)
        print(json.dumps(rows, indent=1) if args.json else "\n".join(table(rows)))
        return EXIT_OK

    return run_main(body, "catalog", args.debug)

