"""The quicklooks of a run and one static ``index.html`` per directory of its products.

After the run record is written (``driver finish``, unless ``--no-quicklook``): every
product of the run gets its quicklook PNG beside it (:mod:`panoseti_pipeline.quicklook`;
a PNG newer than its store is kept), and every directory that holds published products
of the run (``<output>/<obs>/``, or the output directory for a lone ``.pff``) gets
``index.html``:
the run record's status, a table of the products (module, product, level, status,
frames, time span, flagged frames, hot/dead pixels, PFF/L0 compression, L1/L0 size, a
link to the store), their PNGs, the housekeeping PNG of the run bundle, if there is
one, and the timeline of the run's tasks (:mod:`panoseti_pipeline.driver.tasks`, drawn
beside the run record). Every link is relative, so the page opens from the
filesystem (or a copied directory) in any browser with no server, and has no script.
"""

from __future__ import annotations

import html
import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from panoseti_pipeline.driver import tasks
from panoseti_pipeline.driver.record import RECORD_PREFIX, companion, job_status, load_state
from panoseti_pipeline.housekeeping import HK_QUICKLOOK_SUFFIX, find_hk
from panoseti_pipeline.run_bundle import iso_ns
from panoseti_pipeline.store import publish
from panoseti_pipeline.store.facts import read_root, store_facts
from panoseti_pipeline.store.safe_write import write_file

PAGE = "index.html"
MADE = ("ok", "degraded")  # a job's statuses that mean this run wrote its product
STYLE = """body{font-family:sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;font-size:90%}th,td{border:1px solid #bbb;padding:3px 6px}
th{background:#eee}td.num{text-align:right}tr.failed td{background:#fdd}
figure{margin:1em 0}figcaption{font-size:90%;color:#555}img{max-width:100%}
.status-ok{color:#070}.status-failed{color:#a00}"""


def _row_facts(store: Path) -> dict[str, Any]:
    """What the table shows of a published store (its root metadata and time span; no
    pixel is read)."""
    facts = store_facts(store)
    attrs = read_root(store)[1].get("attributes") or {}
    summary = attrs.get("summary", {})
    return {"module": facts.module, "product": facts.data_product, "level": facts.level,
            "frames": facts.frames, "first": iso_ns(facts.first_ns),
            "last": iso_ns(facts.last_ns),
            "flags": {k: v for k, v in facts.flag_counts.items() if v},
            "hot_dead": (f"{summary['hot_pixels']} / {summary['dead_pixels']}"
                         if "hot_pixels" in summary else "-"),
            "compression": facts.pff_to_l0, "l1_l0": facts.l1_to_l0,
            "created": facts.created}


def _fmt(value: Any, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"


def _link(target: Path, page_dir: Path) -> str:
    return quote(os.path.relpath(target, page_dir).replace(os.sep, "/"))


def _run_line(record: dict[str, Any], path: Path | None, page_dir: Path, what: str) -> str:
    """One run, as the page's head describes it: status, inputs, times, host, record."""
    e = html.escape
    run = record.get("run", {})
    status = run.get("exit_status")
    verdict = "ok" if status == 0 else "failed"
    counts = ", ".join(f"{k} {v}" for k, v in run.get("counts", {}).items())
    link = (f'<a href="{_link(path, page_dir)}">{e(path.name)}</a>' if path
            else "no run record")
    return (f'<p class="run">{e(what)}: <b class="status-{verdict}">{verdict}</b> (exit '
            f"status {e(str(status))}; inputs: {e(counts)}), started "
            f"{e(str(run.get('started', '?')))}, finished {e(str(run.get('finished', '?')))}"
            f" on {e(str(run.get('host', '?')))}. Run record: {link}.</p>")


def render_page(page_dir: Path, rows: list[dict[str, Any]], record: dict[str, Any],
                record_path: Path | None,
                records: dict[Path, dict[str, Any]] | None = None,
                timeline: Path | None = None) -> str:
    """The HTML of one directory's page (``rows``: the run's products there, each with the
    run record that made it under ``made_by``, if known; ``record``: this run's;
    ``records``: the run records by path; ``timeline``: the PNG of this run's tasks)."""
    e = html.escape
    records = records or {}
    makers = list(dict.fromkeys(r["made_by"] for r in rows if r.get("made_by")))
    runs = [_run_line(records[m], m, page_dir, "Made by run") for m in makers]
    if record_path not in makers:
        runs.append(_run_line(record, record_path, page_dir,
                              "Latest run (made none of these products)" if makers
                              else "Run"))
    head = ["module", "product", "level", "status", "frames", "time span (UTC)",
            "flagged frames", "hot / dead pixels", "PFF/L0", "L1/L0", "store", "made by"]
    lines = [f"<th>{e(h)}</th>" for h in head]
    body, figures = [], []
    for r in rows:
        span = f"{r['first'] or '?'} to {r['last'] or '?'}" if r.get("frames") else "-"
        flags = ", ".join(f"{k} {v}" for k, v in r.get("flags", {}).items()) or "none"
        store = (f'<a href="{_link(r["store"], page_dir)}/">{e(r["store"].name)}</a>'
                 if r["published"] else e(r["store"].name) + " (not written)")
        maker = r.get("made_by")
        made = (f'<a href="{_link(maker, page_dir)}">{e(maker.name)}</a>' if maker
                else e(f"created {r['created']}" if r.get("created") else "-"))
        cells = [e(str(r.get("module", "-"))), e(str(r.get("product", "-"))),
                 e(str(r.get("level", "-"))), e(r["status"]), e(str(r.get("frames", "-"))),
                 e(span), e(flags), e(r.get("hot_dead", "-"))]
        body.append(f'<tr class="product {e(r["status"])}" data-store="{e(r["store"].name)}">'
                    + "".join(f"<td>{c}</td>" for c in cells)
                    + f'<td class="num">{_fmt(r.get("compression"))}</td>'
                    + f'<td class="num">{_fmt(r.get("l1_l0"))}</td><td>{store}</td>'
                    + f'<td class="made-by">{made}</td></tr>')
        if r.get("png"):
            figures.append(f'<figure id="look-{e(r["store"].name)}"><img src="'
                           f'{_link(r["png"], page_dir)}" alt="quicklook of '
                           f'{e(r["store"].name)}"><figcaption>{e(r["store"].name)}'
                           "</figcaption></figure>")
    for png in find_hk(page_dir, HK_QUICKLOOK_SUFFIX):  # the run's housekeeping
        figures.append(f'<figure id="housekeeping"><img src="{_link(png, page_dir)}" '
                       f'alt="housekeeping of the run"><figcaption>housekeeping: '
                       f"{e(png.name)}</figcaption></figure>")
    if timeline:
        figures.append(f'<figure id="timeline"><img src="{_link(timeline, page_dir)}" '
                       'alt="timeline of the run\'s tasks"><figcaption>where and when each '
                       f"task of the run ran: {e(timeline.name)}</figcaption></figure>")
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>PANOSETI products: {e(page_dir.name)}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>{e(page_dir.name)}</h1>", '<div id="run-status">', *runs, "</div>",
        '<table id="products"><thead><tr>' + "".join(lines) + "</tr></thead><tbody>",
        *body, "</tbody></table>", "<h2>Quicklooks</h2>", *figures, "</body></html>", ""])


def run_records(out_dir: Path) -> dict[Path, dict[str, Any]]:
    """The run records in the output directory, by path (one that does not parse: left
    out, it names no product)."""
    import tomllib

    records = {}
    for path in sorted(out_dir.glob(f"{RECORD_PREFIX}*.toml")):
        try:
            records[path] = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
    return records


def made_by(store: Path, created: str, records: dict[Path, dict[str, Any]]) -> Path | None:
    """The run record that made ``store``: of those listing it as made (its final store,
    not skipped or failed), the latest started no later than the store's ``created``."""
    target = os.path.abspath(store)
    found, found_started = None, ""
    for path, record in records.items():
        started = str(record.get("run", {}).get("started", ""))
        made = any(os.path.abspath(entry.get("l1") or entry.get("l0") or "") == target
                   and entry.get("status") in MADE for entry in record.get("inputs", []))
        if made and started <= created and (found is None or started >= found_started):
            found, found_started = path, started
    return found


def run_products(state: dict[str, Any]) -> list[tuple[Path, str]]:
    """(final store, status) of every job of the run: its L1, or its L0 with --steps 1."""
    out = []
    for job in state["jobs"]:
        status, _ = job_status(job, state["steps"])
        out.append((Path(job["l1"] or job["l0"]), status))
    return out


def _up_to_date(png: Path, store: Path) -> bool:
    """A PNG of ours (a regular file, not a link someone made) newer than its store."""
    try:
        st = png.lstat()
    except FileNotFoundError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_mtime >= (store / "zarr.json").stat().st_mtime


def make_quicklooks(state_file: str | os.PathLike[str],
                    notice: Callable[[str], None] | None = None) -> tuple[list[Path], int]:
    """The PNGs and pages of a run; (pages written, quicklooks that failed)."""
    from panoseti_pipeline import quicklook
    from panoseti_pipeline.errors import PipelineError

    notice = notice or (lambda msg: print(msg, file=sys.stderr))
    failed = 0
    state = load_state(state_file)
    record_path = Path(state["run_record"]) if state.get("run_record") else None
    records = run_records(Path(state["output_dir"])) if state.get("output_dir") else {}
    record = records.get(record_path, {})  # this run's, written into the output directory
    timeline = None
    if record_path:
        try:
            timeline = tasks.draw_timeline(state, companion(record_path, tasks.TIMELINE_PREFIX,
                                                            ".png"))
        except OSError as err:
            notice(f"run.sh: warning: no timeline of the run's tasks: {err}")
            failed += 1
    by_dir: dict[Path, list[dict[str, Any]]] = {}
    for store, status in run_products(state):
        row: dict[str, Any] = {"store": store, "status": status, "published": False}
        level = "L1" if publish.is_published(store, "L1") else "L0"  # any layout's name
        if publish.is_published(store, level):
            row.update(_row_facts(store), published=True)
            row["made_by"] = made_by(store, row["created"], records)
            png = quicklook.png_path(store)
            try:
                if not _up_to_date(png, store):
                    quicklook.quicklook(store)
                row["png"] = png
            except PipelineError as err:
                notice(f"run.sh: warning: no quicklook of {store}: {err}")
                failed += 1
        by_dir.setdefault(store.parent, []).append(row)
    pages = []
    for page_dir, rows in by_dir.items():
        if not any(r["published"] for r in rows):  # nothing there to look at
            continue
        page = page_dir / PAGE
        write_file(page, render_page(page_dir, rows, record, record_path, records,
                                     timeline).encode())
        pages.append(page)
    return pages, failed
