"""What happened in a run: the state file, per-step marks, the summary table, the run record.

``run.sh`` keeps the run's state in one JSON file in its temporary directory: written by
``plan`` (:func:`new_state`), updated after every step (:func:`record_step`) or when a job
is interrupted between steps (:func:`mark_job`), and turned at the end into the table on
stdout (:func:`summary_table`) and the TOML run record in the output directory
(:func:`write_run_record`). Each update replaces the file atomically, so a signal between
two updates leaves the previous state readable, and holds a lock on it (:func:`updating`):
products in flight together record their steps from separate processes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import itertools
import json
import os
import socket
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from panoseti_pipeline.driver.plan import Plan, cluster_summary, images_shape
from panoseti_pipeline.driver.tasks import (
    TASKS_PREFIX,
    pool_threads,
    tasks_document,
    utilization,
)
from panoseti_pipeline.errors import ConfigError
from panoseti_pipeline.store import publish as store_files
from panoseti_pipeline.store.safe_write import write_file

if TYPE_CHECKING:
    from panoseti_pipeline.config import PipelineConfig

RECORD_PREFIX = "run_record_"
STEP_NAMES = {1: "step 1 (PFF -> L0)", 2: "step 2 (L0 -> L1)"}
#: Exit codes of a step stopped by SIGINT / SIGTERM.
INTERRUPTED_CODES = (130, 143)


# --------------------------------------------------------------------------- state file


def load_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_state(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Replace the state file atomically (temporary file + rename)."""
    write_file(path, json.dumps(state, indent=1).encode())


@contextlib.contextmanager
def updating(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """The state to change in the ``with`` block, written back at its end; no other
    process updates it meanwhile (a lock file beside it: the state file itself is
    replaced, so it cannot hold the lock)."""
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = load_state(path)
        yield state
        write_state(path, state)


def new_state(plan: Plan, cfg: PipelineConfig, config_path: str, out: Path, l0: Path,
              steps: tuple[int, ...], options: dict[str, bool], command: str) -> dict[str, Any]:
    """The state of a run about to start: its plan, options and cluster, no step done."""
    return {
        "version": 1,
        "started": store_files.utc_now(),
        "started_epoch": time.time(),
        "command": command.strip(),
        "config_file": os.path.abspath(config_path),
        "output_dir": str(out),
        "l0_dir": str(l0),
        "steps": list(steps),
        "options": options,
        "cluster": cluster_summary(cfg),
        "notices": plan.notices,
        "jobs": [{"name": j.name, "kind": j.kind, "inputs": j.inputs, "l0": j.l0, "l1": j.l1,
                  "action": j.action, "made_otherwise": j.made_otherwise,
                  "input_bytes": j.input_bytes, "steps": {}}
                 for j in plan.jobs],
    }


def _epoch(text: str) -> float:
    return float(text.replace(",", "."))  # bash's EPOCHREALTIME follows the locale


def _store_facts(store: str) -> dict[str, Any]:
    """Bytes and frames of a product, what step 1 skipped of its input (a degraded
    conversion: corrupt byte ranges re-synchronised over, PFF_FORMAT.md), and the
    warnings of step 2's summary (e.g. a flash in the baseline window)."""
    facts: dict[str, Any] = {"bytes": store_files.store_bytes(store)}
    shape = images_shape(Path(store))
    if shape:
        facts["frames"] = shape[0]
    from panoseti_pipeline.errors import InputError
    from panoseti_pipeline.store.facts import (
        l1_to_l0_ratio,
        pff_to_l0_ratio,
        read_root,
        skipped_ranges,
    )

    try:
        attrs = read_root(store)[1].get("attributes", {})
    except InputError:
        attrs = {}
    for name, ratio in (("pff_to_l0", pff_to_l0_ratio(attrs)),
                        ("l1_to_l0", l1_to_l0_ratio(attrs))):
        if ratio is not None:
            facts[name] = ratio
    skipped = skipped_ranges(attrs)
    if skipped:
        facts["skipped"] = skipped
    summary = attrs.get("summary")
    warnings = summary.get("warnings") if isinstance(summary, dict) else None
    if warnings and isinstance(warnings, list):
        facts["warnings"] = [str(w) for w in warnings]
    return facts


def record_step(state: dict[str, Any], job_index: int, step: int, status: str, *,
                exit_code: int = 0, start: str = "", end: str = "",
                l0_removed: bool = False, reason: str = "",
                tasks: dict[str, Any] | None = None) -> None:
    """Add one step's outcome (status, exit code, seconds, the store's size, the error
    line of a failed step, and ``tasks``, where its tasks ran: ``driver.tasks``) to
    ``state``.

    ``start`` and ``end`` are bash times (``EPOCHREALTIME`` or ``date +%s``). The store
    is measured now, while it is there (the L0 is removed after step 2).
    """
    job = state["jobs"][job_index]
    entry: dict[str, Any] = {"status": status, "exit_code": exit_code}
    if reason and status != "ok":
        entry["reason"] = reason
    if start and end:
        entry["seconds"] = round(max(0.0, _epoch(end) - _epoch(start)), 3)
    entry.update(tasks or {})
    if status == "ok":
        store = job["l0"] if step == 1 else job["l1"]
        if store and Path(store).is_dir():
            facts = _store_facts(store)
            job["l0_bytes" if step == 1 else "l1_bytes"] = facts["bytes"]
            job.update({k: facts[k] for k in ("pff_to_l0", "l1_to_l0", "frames", "skipped",
                                              "warnings") if k in facts})
    job["steps"][str(step)] = entry
    if l0_removed:
        job["l0_removed"] = True


def mark_job(state: dict[str, Any], job_index: int, mark: str) -> None:
    """Mark a job (e.g. interrupted between its steps, when no step was running)."""
    state["jobs"][job_index]["mark"] = mark


# --------------------------------------------------------------------------- summary


def job_status(job: dict[str, Any], steps: Sequence[int]) -> tuple[str, str]:
    """(status, why) of a job: ok, degraded (done, but corrupt input bytes were skipped),
    skipped, failed, not-run."""
    if job["action"] == "skip":
        if job.get("made_otherwise"):
            return "skipped", (f"complete product already there, {job['made_otherwise']} "
                               "(--overwrite redoes it)")
        return "skipped", "complete product already there"
    done = job.get("steps", {})
    interrupted = job.get("mark") == "interrupted"  # between two steps
    for step in steps:
        entry = done.get(str(step))
        if entry is None:
            if interrupted or any(e["status"] != "ok" for e in done.values()):
                return "failed", f"interrupted before {STEP_NAMES[step]}"
            return "not-run", "not started (an earlier input failed or the run was stopped)"
        if entry["status"] != "ok":
            code = entry.get("exit_code")
            if code in INTERRUPTED_CODES or entry["status"] == "interrupted":
                return "failed", f"{STEP_NAMES[step]} failed (interrupted)"
            if entry.get("reason"):
                return "failed", f"{STEP_NAMES[step]} failed: {entry['reason']}"
            return "failed", f"{STEP_NAMES[step]} failed (exit status {code})"
    if job.get("skipped"):
        lost = sum(r.get("frames_lost", 0) for r in job["skipped"])
        return "degraded", (f"{len(job['skipped'])} corrupt byte range(s) of the input "
                            f"skipped (~{lost} frame(s) lost; see skipped_ranges)")
    return "ok", ""


def _mb(n: Any) -> str:
    return f"{n / 1e6:.1f}" if isinstance(n, (int, float)) else "-"


def _ratio(ratio: Any) -> str:
    """A ratio the stores recorded (``store.facts``: one definition each), two decimals."""
    return f"{ratio:.2f}" if isinstance(ratio, (int, float)) else "-"


def _secs(job: dict[str, Any], step: int) -> str:
    s = job.get("steps", {}).get(str(step), {}).get("seconds")
    return f"{s:.1f}" if isinstance(s, (int, float)) else "-"


def summary_table(state: dict[str, Any]) -> list[str]:
    """One row per input: status, frames, sizes, ratios, seconds per step."""
    steps = state["steps"]
    head = ["#", "input", "status", "frames", "PFF MB", "L0 MB", "L1 MB", "PFF/L0", "L1/L0",
            "step1 s", "step2 s"]
    rows = []
    for k, job in enumerate(state["jobs"], 1):
        status, _ = job_status(job, steps)
        pff_bytes = job["input_bytes"] if steps != [2] else None
        l0_bytes = job.get("l0_bytes", job["input_bytes"] if steps == [2] else None)
        l1 = job.get("l1_bytes")
        rows.append([str(k), job["name"], status, str(job.get("frames", "-")), _mb(pff_bytes),
                     _mb(l0_bytes), _mb(l1), _ratio(job.get("pff_to_l0")),
                     _ratio(job.get("l1_to_l0")),
                     _secs(job, 1), _secs(job, 2)])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    left = {1, 2}

    def fmt(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip()

    return [fmt(head), fmt(["-" * w for w in widths]), *map(fmt, rows)]


def failure_lines(state: dict[str, Any]) -> list[str]:
    """One line per input that failed or did not run, saying why."""
    lines = []
    for k, job in enumerate(state["jobs"], 1):
        status, why = job_status(job, state["steps"])
        if status in ("failed", "not-run", "degraded"):
            lines.append(f"{status}: {k}. {job['name']}: {why}")
    return lines


def warning_lines(state: dict[str, Any]) -> list[str]:
    """One line per warning of a product (its L1 summary's), naming it."""
    return [f"warning: {k}. {job['name']}: {w}"
            for k, job in enumerate(state["jobs"], 1) for w in job.get("warnings", [])]


def measure_skipped(state: dict[str, Any]) -> None:
    """Sizes and frames of the products an earlier run made (the skipped jobs)."""
    for job in state["jobs"]:
        final = job["l1"] or job["l0"]
        if job["action"] == "skip" and Path(final).is_dir():
            facts = _store_facts(final)
            job["l1_bytes" if job["l1"] else "l0_bytes"] = facts["bytes"]
            job.update({k: facts[k] for k in ("pff_to_l0", "l1_to_l0", "warnings") if k in facts})
            job.setdefault("frames", facts.get("frames"))


# --------------------------------------------------------------------------- run record


def _toml_clean(value: Any) -> Any:
    """Drop None (TOML has no null) recursively."""
    if isinstance(value, dict):
        return {k: _toml_clean(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_toml_clean(v) for v in value if v is not None]
    return value


def _user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def run_record(state: dict[str, Any], exit_code: int, cluster_address: str = "",
               cluster_log: str = "") -> dict[str, Any]:
    """The run record (a TOML-ready dict): run, cluster, software, config, inputs."""
    from panoseti_pipeline.config import load_config
    from panoseti_pipeline.store.layout import software_versions

    steps = state["steps"]
    cluster = dict(state["cluster"])
    if cluster_address:
        cluster["scheduler_address"] = cluster_address
    if cluster_log:
        cluster["manager_output"] = cluster_log.strip().splitlines()
    try:
        config = load_config(state["config_file"]).as_dict()
    except ConfigError as err:  # edited during the run
        config = {"error": str(err)}
    inputs = []
    counts: dict[str, int] = {}
    for job in state["jobs"]:
        status, why = job_status(job, steps)
        counts[status] = counts.get(status, 0) + 1
        entry = {"name": job["name"], "kind": job["kind"], "status": status, "reason": why or None,
                 "files": job["inputs"], "l0": job["l0"] or None, "l1": job["l1"] or None,
                 "input_bytes": job["input_bytes"], "frames": job.get("frames"),
                 "l0_bytes": job.get("l0_bytes"), "l1_bytes": job.get("l1_bytes"),
                 "l0_removed": job.get("l0_removed", False),
                 "l0_kept": steps == [1, 2] and store_files.is_published(job["l0"], "L0"),
                 "skipped_ranges": job.get("skipped"), "warnings": job.get("warnings")}
        for step, info in sorted(job.get("steps", {}).items()):  # tasks: in their file
            entry[f"step{step}"] = info | ({"tasks": len(info["tasks"])} if "tasks" in info
                                           else {})
        inputs.append(entry)
    finished = time.time()
    busy = utilization(state)
    record = {
        "run": {"started": state["started"], "finished": store_files.utc_now(),
                "seconds": round(finished - state["started_epoch"], 3),
                "exit_status": exit_code, "host": socket.gethostname(),
                "user": _user(), "command": state["command"],
                "working_directory": os.getcwd(), "config_file": state["config_file"],
                "output_dir": state["output_dir"], "l0_dir": state["l0_dir"],
                "steps": steps, **state["options"], "counts": counts,
                "notices": state["notices"]},
        "cluster": cluster,
        "utilization": busy.as_dict() | {"pools": pool_threads(state)} if busy else None,
        "software": software_versions(),
        "config": config,
        "inputs": inputs,
    }
    return _toml_clean(record)


def companion(record_path: Path, prefix: str, suffix: str) -> Path:
    """The file of the run record's run named ``prefix`` + its UTC time + ``suffix``."""
    stamp = record_path.name.removeprefix(RECORD_PREFIX).removesuffix(".toml")
    return record_path.with_name(f"{prefix}{stamp}{suffix}")


def write_run_record(out: Path, record: dict[str, Any],
                     state: dict[str, Any] | None = None) -> Path:
    """Write ``record`` as ``<out>/run_record_<UTC time>[_n].toml`` and, when the run's
    ``state`` has tasks (its ``[utilization]``), the tasks file beside it (named in
    ``utilization.tasks_file``); never overwrites anything (a file or a link there: the
    next ``_n``)."""
    import tomli_w

    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    with_tasks = state is not None and "utilization" in record
    for n in itertools.count(1):
        path = out / f"{RECORD_PREFIX}{stamp}{f'_{n}' if n > 1 else ''}.toml"
        tasks = companion(path, TASKS_PREFIX, ".json")
        try:
            if with_tasks:
                record["utilization"]["tasks_file"] = tasks.name
                write_file(tasks, json.dumps(tasks_document(state, path.name)).encode(),
                           exclusive=True)
        except FileExistsError:
            continue
        text = f"# PANOSETI L0 -> L1 run record written by run.sh\n{tomli_w.dumps(record)}"
        try:
            write_file(path, text.encode(), exclusive=True)
            return path
        except FileExistsError:
            if with_tasks:
                tasks.unlink()  # ours, just written
    raise AssertionError("unreachable")
