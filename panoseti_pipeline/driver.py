"""The Python side of ``run.sh``: plan the jobs, record what happened, summarise.

``run.sh`` stays a thin bash driver (argument handling, processes, signals, cleanup);
everything that needs Python lives here, as subcommands it calls:

``plan``
    Validate before any work: every input exists, is readable and has a PFF name (a
    ``.pffd`` directory expands to its streams: one job per (dp, module), seqno files in
    order, 0-byte files and ``hk.pff`` skipped with a notice); the config is valid; the
    output and L0 directories are writable and outside the input tree; the free space is
    enough for the L0 + L1 estimate. Every problem is listed at once on stderr (exit 2).
    Otherwise prints the plan for bash (``--state``) or for people (``--dry-run``).
``record``
    Add one step's outcome (status, exit code, seconds, store sizes) to the state file.
``summary``
    Print the table per input and write the run record (TOML) into the output directory.
``demo-observation``, ``demo-config``
    Generate the small observation and the single-machine config of ``run.sh --demo``.
``config-get``, ``descendants``
    One config value; the process ids below a process (cleanup of a hung cluster manager).

The plan for bash is one line per record, fields separated by TABs, never an empty field
(paths with a TAB or a newline are refused by ``plan``)::

    cluster <TAB> 0|1 <TAB> seconds to wait for the scheduler file <TAB> description
    l0dir   <TAB> directory of the temporary L0 stores
    umask   <TAB> octal umask for the files of the run ([run] group_writable)
    job     <TAB> index <TAB> run|skip <TAB> name <TAB> L0 path <TAB> L1 path|- <TAB> input ...

Examples::

    python3 run_plan.py plan --config config.toml --output /scratch/L1 --dry-run obs.pffd
    python3 run_plan.py summary /tmp/panoseti_run.x/state.json --exit-code 0
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from panoseti_pipeline.errors import EXIT_OK, EXIT_USAGE, ConfigError, run_main
from panoseti_pipeline.store import publish as store_files

PROG = "panoseti_pipeline driver"
L0_SUFFIX = "_L0.zarr"
L1_SUFFIX = "_L1.zarr"
DEFAULT_L0_SUBDIR = ".l0_tmp"
RECORD_PREFIX = "run_record_"
# Seconds run.sh waits for the scheduler file on top of [cluster] startup_timeout_s
# (interpreter and Dask imports, SSH logins).
CLUSTER_WAIT_MARGIN_S = 60
# Bytes per frame an L1 store needs besides its float32 pixels (time, timestamps, flags,
# header fields of four quabos), before compression.
L1_FRAME_OVERHEAD = 96
STEP_NAMES = {1: "step 1 (PFF -> L0)", 2: "step 2 (L0 -> L1)"}


# --------------------------------------------------------------------------- plan


@dataclass
class Job:
    """One product to make: the PFF files of one stream (or one L0 store) -> one store."""

    name: str
    inputs: list[str]
    l0: str
    l1: str  # "" when only step 1 runs (the L0 is then the product)
    input_bytes: int
    est_l0_bytes: int
    est_l1_bytes: int
    action: str = "run"  # "run" or "skip" (a complete product is already in place)
    kind: str = ""  # "file", "stream of <dir>", "L0 store"


@dataclass
class Plan:
    jobs: list[Job] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)


def _bad_chars(path: str) -> bool:
    return "\t" in path or "\n" in path or "\r" in path


def _is_within(path: Path, parent: Path) -> bool:
    try:
        path.relative_to(parent)
    except ValueError:
        return False
    return True


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(path))


def _existing_ancestor(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_writable_dir(path: Path, what: str) -> str | None:
    """Why ``path`` cannot be (created and) written as a directory, or None."""
    if path.exists():
        if not path.is_dir():
            return f"{path}: {what} exists and is not a directory"
        if not os.access(path, os.W_OK | os.X_OK):
            return f"{path}: {what} is not writable"
        return None
    base = _existing_ancestor(path)
    if not base.is_dir():
        return f"{path}: cannot create {what}: {base} is not a directory"
    if not os.access(base, os.W_OK | os.X_OK):
        return f"{path}: cannot create {what}: {base} is not writable"
    return None


def _l1_estimate(frames: int, pixels: int) -> int:
    return frames * (pixels * 4 + L1_FRAME_OVERHEAD)


def _images_shape(store: Path) -> list[int] | None:
    try:
        with open(store / "images" / "zarr.json", encoding="utf-8") as f:
            shape = json.load(f).get("shape")
    except (OSError, ValueError, AttributeError):
        return None
    return shape if isinstance(shape, list) else None


def _stream_job(files: list[Any], name: str, kind: str) -> Job:
    """A job for the (non-empty) PFF files of one stream, in seqno order."""
    product = files[0].product
    nbytes = sum(f.path.stat().st_size for f in files)
    frames = nbytes // product.frame_bytes
    pixels = product.shape[0] * product.shape[1]
    return Job(name=name, inputs=[str(f.path) for f in files], l0="", l1="",
               input_bytes=nbytes, est_l0_bytes=nbytes,
               est_l1_bytes=_l1_estimate(frames, pixels), kind=kind)


def _expand_pffd(directory: Path, plan: Plan) -> list[Job]:
    """One job per (dp, module) stream of an observation directory."""
    from panoseti_pipeline import pff
    from panoseti_pipeline.errors import PFFNameError

    streams: dict[tuple[str, int], list[Any]] = {}
    others = []
    for entry in sorted(directory.iterdir()):
        if entry.name == pff.HOUSEKEEPING_NAME:
            plan.notices.append(f"{entry}: housekeeping file, skipped")
            continue
        if entry.suffix != ".pff" or not entry.is_file():
            others.append(entry.name)
            continue
        if not os.access(entry, os.R_OK):
            plan.problems.append(f"{entry}: not readable (permission denied)")
            continue
        try:
            name = pff.parse_name(entry)
        except PFFNameError as err:
            plan.problems.append(str(err))
            continue
        if entry.stat().st_size == 0:
            plan.notices.append(f"{entry}: empty (0 bytes), skipped")
            continue
        streams.setdefault((name.dp, name.module), []).append(name)
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        plan.notices.append(f"{directory}: {len(others)} entries that are not PFF data files "
                            f"ignored ({shown})")
    if not streams:
        plan.problems.append(f"{directory}: no PFF data in this .pffd directory (no non-empty "
                             "start_*.dp_*.module_*.seqno_*.pff file)")
        return []
    jobs = []
    for (dp, module), names in sorted(streams.items()):
        names.sort(key=lambda n: n.seqno)
        seqnos = [n.seqno for n in names]
        if len(set(seqnos)) != len(seqnos):
            plan.problems.append(f"{directory}: dp_{dp} module_{module} has the same seqno "
                                 f"twice ({', '.join(n.path.name for n in names)})")
            continue
        if len({n.stream for n in names}) > 1:
            plan.problems.append(f"{directory}: dp_{dp} module_{module} files of different "
                                 "recordings (start time or other name keys differ: "
                                 f"{', '.join(n.path.name for n in names)}); give each "
                                 "recording its own .pffd directory")
            continue
        missing = pff.missing_seqnos(names)
        if missing:
            plan.notices.append(f"{directory}: dp_{dp} module_{module}: seqno "
                                f"{', '.join(map(str, missing))} missing; joined without it")
        stem = directory.name[: -len(".pffd")]
        jobs.append(_stream_job(names, f"{stem}.dp_{dp}.module_{module}",
                                f"stream of {directory.name}"))
    return jobs


def _file_job(path: Path, plan: Plan) -> Job | None:
    from panoseti_pipeline import pff
    from panoseti_pipeline.errors import PFFNameError

    try:
        name = pff.parse_name(path)
    except PFFNameError as err:
        plan.problems.append(str(err))
        return None
    if path.stat().st_size == 0:
        plan.problems.append(f"{path}: empty (0 bytes): nothing to convert")
        return None
    return _stream_job([name], path.name[: -len(".pff")], "file")


def _l0_job(path: Path, plan: Plan) -> Job | None:
    """--steps 2: the input is an L0 store written by step 1."""
    if not path.is_dir() or not store_files.is_published(path, "L0"):
        plan.problems.append(f"{path}: not a complete L0 Zarr store (with --steps 2 every "
                             "input is an L0 store written by step 1)")
        return None
    stem = path.name
    for suffix in (L0_SUFFIX, ".zarr"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    shape = _images_shape(path) or [0, 0, 0]
    pixels = 1
    for s in shape[1:]:
        pixels *= s
    size = store_files.store_bytes(path)
    return Job(name=stem, inputs=[str(path)], l0=str(path), l1="", input_bytes=size,
               est_l0_bytes=0, est_l1_bytes=_l1_estimate(shape[0], pixels), kind="L0 store")


def _input_jobs(inputs: Sequence[str], steps: tuple[int, ...], plan: Plan
                ) -> tuple[list[Job], list[Path]]:
    """Jobs of every input, and the input trees (directories the outputs must avoid)."""
    jobs: list[Job] = []
    trees: list[Path] = []
    seen: dict[Path, str] = {}
    for text in inputs:
        path = Path(os.path.abspath(text))
        if _bad_chars(text):
            plan.problems.append(f"{text!r}: paths with a TAB or newline are not supported")
            continue
        if not path.exists():
            plan.problems.append(f"{path}: no such file or directory")
            continue
        if not os.access(path, os.R_OK) or (path.is_dir() and not os.access(path, os.X_OK)):
            plan.problems.append(f"{path}: not readable (permission denied)")
            continue
        real = _real(path)
        if real in seen:
            plan.problems.append(f"{path}: given twice (also as {seen[real]})")
            continue
        seen[real] = text
        if steps == (2,):
            job = _l0_job(path, plan)
            if job:
                jobs.append(job)
                trees.append(real)
            continue
        if path.is_dir():
            if path.suffix != ".pffd":
                plan.problems.append(f"{path}: a directory that is not a .pffd observation "
                                     "directory (give .pffd directories or .pff files)")
                continue
            trees.append(real)
            jobs.extend(_expand_pffd(path, plan))
        elif not path.is_file():
            plan.problems.append(f"{path}: not a regular file")
        else:
            if real.parent.suffix == ".pffd":
                trees.append(real.parent)
            job = _file_job(path, plan)
            if job:
                jobs.append(job)
    # A file given on its own and again through its .pffd directory.
    by_file: dict[str, str] = {}
    for job in jobs:
        for f in job.inputs:
            key = str(_real(f))
            if key in by_file and by_file[key] != job.name:
                plan.problems.append(f"{f}: given twice (on its own and in a .pffd directory)")
            by_file[key] = job.name
    return jobs, trees


def _human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(nbytes) < 1000 or unit == "TB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.1f} TB"


def free_space_problems(jobs: Sequence[Job], out_dir: Path, l0_dir: Path, steps: tuple[int, ...],
                        keep_l0: bool,
                        disk_usage: Callable[[str], Any] = shutil.disk_usage) -> list[str]:
    """Is there room for the jobs that will run? L1 stores stay; L0 stores are removed
    after each input (only the largest one at a time) unless kept or only step 1 runs."""
    todo = [j for j in jobs if j.action == "run"]
    if not todo:
        return []
    need: dict[int, list[Any]] = {}  # st_dev -> [bytes, where, parts]

    def add(directory: Path, nbytes: int, what: str) -> None:
        base = _existing_ancestor(directory)
        entry = need.setdefault(base.stat().st_dev, [0, base, []])
        entry[0] += nbytes
        entry[2].append(f"{what} {_human(nbytes)}")

    if 1 in steps:
        l0_sizes = [j.est_l0_bytes for j in todo]
        kept = keep_l0 or 2 not in steps
        add(l0_dir, sum(l0_sizes) if kept else max(l0_sizes),
            "L0" if kept else "L0 (largest, removed after each input)")
    if 2 in steps:
        add(out_dir, sum(j.est_l1_bytes for j in todo), "L1")
    problems = []
    for nbytes, base, parts in need.values():
        free = disk_usage(str(base)).free
        if nbytes > free:
            problems.append(f"{base}: not enough free space: about {_human(nbytes)} needed "
                            f"({' + '.join(parts)}), {_human(free)} free")
    return problems


def _interface_problem(interface: str, source: str) -> str | None:
    """A local cluster binds to ``interface``: does this machine have it?"""
    if not interface:
        return None
    try:
        import psutil
    except ImportError:
        return None
    known = sorted(psutil.net_if_addrs())
    if interface in known:
        return None
    return (f"{source}: [cluster] interface = {json.dumps(interface)}: no such network "
            f"interface on this machine (it has: {', '.join(known)})")


def make_plan(inputs: Sequence[str], config_path: str, out_dir: str, *,
              steps: tuple[int, ...] = (1, 2), l0_dir: str = "", keep_l0: bool = False,
              overwrite: bool = False) -> tuple[Plan, Any, Path, Path]:
    """Validate everything and list the jobs; problems are collected, never raised."""
    from panoseti_pipeline.config import load_config

    plan = Plan()
    cfg = None
    if not config_path.endswith(".toml"):
        plan.problems.append(f"{config_path}: the config file must be a .toml file")
    try:
        cfg = load_config(config_path)
    except ConfigError as err:
        plan.problems.extend(str(err).splitlines())
    if cfg and cfg.cluster.use_dask and cfg.cluster.cluster_type == "local":
        problem = _interface_problem(cfg.cluster.interface, cfg.source)
        if problem:
            plan.problems.append(problem)
    if not inputs:
        plan.problems.append("no input given")
    jobs, trees = _input_jobs(inputs, steps, plan)
    out = Path(os.path.abspath(out_dir))
    if _bad_chars(out_dir):
        plan.problems.append(f"{out_dir!r}: paths with a TAB or newline are not supported")
    configured = l0_dir or (cfg.run.l0_dir if cfg else "")
    if steps == (1,):
        l0 = out  # the L0 stores are the products
    else:
        l0 = Path(os.path.abspath(configured)) if configured else out / DEFAULT_L0_SUBDIR
    for what, path in (("output directory", out), ("L0 directory", l0)):
        problem = _check_writable_dir(path, what)
        if problem:
            plan.problems.append(problem)
        real = _real(path)
        for tree in trees:
            if _is_within(real, tree):
                plan.problems.append(f"{path}: the {what} is inside the input tree {tree} "
                                     "(inputs are read-only; choose another directory)")
    if l0 != out and _bad_chars(str(l0)):
        plan.problems.append(f"{str(l0)!r}: paths with a TAB or newline are not supported")

    names: dict[str, str] = {}
    for job in jobs:
        if steps != (2,):
            job.l0 = str(l0 / f"{job.name}{L0_SUFFIX}")
        if 2 in steps:
            job.l1 = str(out / f"{job.name}{L1_SUFFIX}")
        final = Path(job.l1 or job.l0)
        if job.name in names:
            plan.problems.append(f"{job.inputs[0]}: output name {final.name} is also the "
                                 f"output of {names[job.name]}")
        names[job.name] = job.inputs[0]
        level = "L1" if job.l1 else "L0"
        if not overwrite and store_files.is_published(final, level):
            job.action = "skip"
        elif final.exists() and not final.is_dir():
            plan.problems.append(f"{final}: exists and is not a Zarr store")
    plan.jobs = jobs
    if not plan.problems:
        plan.problems.extend(free_space_problems(jobs, out, l0, steps, keep_l0))
    return plan, cfg, out, l0


def _cluster_summary(cfg: Any) -> dict[str, Any]:
    c = cfg.cluster
    info: dict[str, Any] = {"use_dask": c.use_dask}
    if not c.use_dask:
        info["description"] = (f"no Dask cluster: each step runs locally with "
                               f"{cfg.pff_to_zarr.num_workers} tasks in parallel")
        return info
    info["cluster_type"] = c.cluster_type
    info["interface"] = c.interface
    if c.cluster_type == "local":
        info.update(workers=c.local_workers, threads_per_worker=c.local_threads_per_worker,
                    memory_per_worker=c.local_memory_per_worker)
        shape = (f"{c.local_workers} workers x {c.local_threads_per_worker} threads, "
                 f"{c.local_memory_per_worker} each")
    elif c.cluster_type == "ssh":
        info.update(hosts=list(c.ssh_hosts), workers=c.n_workers,
                    threads_per_worker=c.ssh_threads_per_worker,
                    memory_per_worker=c.ssh_memory_per_worker)
        shape = (f"{c.n_workers} workers on {len(c.ssh_hosts)} hosts "
                 f"({', '.join(c.ssh_hosts)}) x {c.ssh_threads_per_worker} threads, "
                 f"{c.ssh_memory_per_worker} each")
    else:
        info["scheduler_address"] = c.scheduler_address
        shape = f"the running scheduler at {c.scheduler_address}"
    where = f", interface {c.interface}" if c.interface else ""
    info["description"] = f"Dask {c.cluster_type} cluster: {shape}{where}"
    return info


def _print_dry_run(plan: Plan, cfg: Any, out: Path, l0: Path, steps: tuple[int, ...],
                   keep_l0: bool) -> None:
    n_run = sum(j.action == "run" for j in plan.jobs)
    print(f"Plan (dry run: nothing is created, no cluster started); config {cfg.source}")
    print(f"  steps:   {','.join(map(str, steps))}")
    print(f"  output:  {out}")
    if steps != (2,) and l0 != out:
        kept = "kept (--keep-l0)" if keep_l0 else "removed after each input"
        print(f"  L0 dir:  {l0} ({kept})")
    print(f"  cluster: {_cluster_summary(cfg)['description']}")
    print(f"  inputs:  {len(plan.jobs)} ({n_run} to run, {len(plan.jobs) - n_run} already done)")
    for k, job in enumerate(plan.jobs, 1):
        done = "  [skip: complete product already there]" if job.action == "skip" else ""
        print(f"{k:4d}. {job.name}  ({job.kind}, {_human(job.input_bytes)}){done}")
        for f in job.inputs:
            print(f"        input {f}")
        if steps != (2,):
            print(f"        L0    {job.l0}")
        if job.l1:
            print(f"        L1    {job.l1}")
    est = sum(j.est_l1_bytes for j in plan.jobs if j.action == "run") if 2 in steps else 0
    if est:
        print(f"  estimated L1 size: {_human(est)} (uncompressed float32; compression helps)")


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def cmd_plan(args: argparse.Namespace) -> int:
    steps = parse_steps(args.steps)
    plan, cfg, out, l0 = make_plan(args.inputs, args.config, args.output, steps=steps,
                                   l0_dir=args.l0_dir, keep_l0=args.keep_l0,
                                   overwrite=args.overwrite)
    for notice in plan.notices:
        print(f"run.sh: note: {notice}", file=sys.stderr)
    if plan.problems:
        n = len(plan.problems)
        print(f"run.sh: error: {n} problem{'s' if n > 1 else ''} found before any work "
              "(nothing was started):", file=sys.stderr)
        for problem in plan.problems:
            print(f"run.sh: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    if args.dry_run:
        _print_dry_run(plan, cfg, out, l0, steps, args.keep_l0)
        return EXIT_OK
    cluster = _cluster_summary(cfg)
    state = {
        "version": 1,
        "started": store_files.utc_now(),
        "started_epoch": time.time(),
        "command": args.command_line.strip(),
        "config_file": os.path.abspath(args.config),
        "output_dir": str(out),
        "l0_dir": str(l0),
        "steps": list(steps),
        "options": {"keep_l0": args.keep_l0, "overwrite": args.overwrite,
                    "keep_going": args.keep_going},
        "cluster": cluster,
        "notices": plan.notices,
        "jobs": [{"name": j.name, "kind": j.kind, "inputs": j.inputs, "l0": j.l0, "l1": j.l1,
                  "action": j.action, "input_bytes": j.input_bytes, "steps": {}}
                 for j in plan.jobs],
    }
    if args.state:
        _write_json(Path(args.state), state)
    timeout = int(cfg.cluster.startup_timeout_s) + CLUSTER_WAIT_MARGIN_S
    print(f"cluster\t{int(cfg.cluster.use_dask)}\t{timeout}\t{cluster['description']}")
    print(f"l0dir\t{l0}")
    current = os.umask(0)
    os.umask(current)
    print(f"umask\t{store_files.permission_umask(cfg.run.group_writable, current):04o}")
    for k, j in enumerate(plan.jobs):
        print("\t".join(["job", str(k), j.action, j.name, j.l0, j.l1 or "-", *j.inputs]))
    return EXIT_OK


def parse_steps(text: str) -> tuple[int, ...]:
    steps = {"1": (1,), "2": (2,), "1,2": (1, 2), "12": (1, 2), "2,1": (1, 2)}.get(text)
    if steps is None:
        raise ConfigError(f"--steps {text}: expected 1, 2 or 1,2")
    return steps


# --------------------------------------------------------------------------- record


def _load_state(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _epoch(text: str) -> float:
    return float(text.replace(",", "."))  # bash's EPOCHREALTIME follows the locale


def _store_facts(store: str) -> dict[str, Any]:
    facts: dict[str, Any] = {"bytes": store_files.store_bytes(store)}
    shape = _images_shape(Path(store))
    if shape:
        facts["frames"] = shape[0]
    return facts


def cmd_record(args: argparse.Namespace) -> int:
    path = Path(args.state)
    state = _load_state(args.state)
    job = state["jobs"][args.job]
    entry: dict[str, Any] = {"status": args.status, "exit_code": args.exit_code}
    if args.start and args.end:
        entry["seconds"] = round(max(0.0, _epoch(args.end) - _epoch(args.start)), 3)
    if args.status == "ok":
        store = job["l0"] if args.step == 1 else job["l1"]
        if store and Path(store).is_dir():
            facts = _store_facts(store)
            job["l0_bytes" if args.step == 1 else "l1_bytes"] = facts["bytes"]
            if "frames" in facts:
                job["frames"] = facts["frames"]
    job["steps"][str(args.step)] = entry
    if args.l0_removed:
        job["l0_removed"] = True
    _write_json(path, state)
    return EXIT_OK


def cmd_mark(args: argparse.Namespace) -> int:
    """Mark a job interrupted between its steps (no step was running)."""
    state = _load_state(args.state)
    state["jobs"][args.job]["mark"] = args.mark
    _write_json(Path(args.state), state)
    return EXIT_OK


# --------------------------------------------------------------------------- summary


def job_status(job: dict[str, Any], steps: Sequence[int]) -> tuple[str, str]:
    """(status, why) of a job: ok, skipped, failed, not-run."""
    mark = job.get("mark", "")
    if job["action"] == "skip" or mark == "skipped":
        return "skipped", "complete product already there"
    done = job.get("steps", {})
    for step in steps:
        entry = done.get(str(step))
        if entry is None:
            if mark == "interrupted" or any(e["status"] != "ok" for e in done.values()):
                return "failed", f"interrupted before {STEP_NAMES[step]}"
            return "not-run", "not started (an earlier input failed or the run was stopped)"
        if entry["status"] != "ok":
            code = entry.get("exit_code")
            why = ("interrupted" if code in (130, 143) or entry["status"] == "interrupted"
                   else f"exit status {code}")
            return "failed", f"{STEP_NAMES[step]} failed ({why})"
    return "ok", ""


def _mb(n: Any) -> str:
    return f"{n / 1e6:.1f}" if isinstance(n, (int, float)) else "-"


def _ratio(a: Any, b: Any) -> str:
    ok = isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0
    return f"{a / b:.2f}" if ok else "-"


def _secs(job: dict[str, Any], step: int) -> str:
    s = job.get("steps", {}).get(str(step), {}).get("seconds")
    return f"{s:.1f}" if isinstance(s, (int, float)) else "-"


def summary_table(state: dict[str, Any]) -> list[str]:
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
                     _mb(l0_bytes), _mb(l1), _ratio(pff_bytes, l0_bytes), _ratio(l1, l0_bytes),
                     _secs(job, 1), _secs(job, 2)])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    left = {1, 2}

    def fmt(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip()

    return [fmt(head), fmt(["-" * w for w in widths]), *map(fmt, rows)]


def _toml_clean(value: Any) -> Any:
    """Drop None (TOML has no null) recursively."""
    if isinstance(value, dict):
        return {k: _toml_clean(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_toml_clean(v) for v in value if v is not None]
    return value


def run_record(state: dict[str, Any], exit_code: int, cluster_address: str = "",
               cluster_log: str = "") -> dict[str, Any]:
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
                 "l0_removed": job.get("l0_removed", False)}
        for step, info in sorted(job.get("steps", {}).items()):
            entry[f"step{step}"] = info
        inputs.append(entry)
    finished = time.time()
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
        "software": software_versions(),
        "config": config,
        "inputs": inputs,
    }
    return _toml_clean(record)


def _user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def cmd_summary(args: argparse.Namespace) -> int:
    import tomli_w

    state = _load_state(args.state)
    address = args.cluster_address
    for job in state["jobs"]:  # what is there of the products made by an earlier run
        final = job["l1"] or job["l0"]
        if job["action"] == "skip" and Path(final).is_dir():
            facts = _store_facts(final)
            job["l1_bytes" if job["l1"] else "l0_bytes"] = facts["bytes"]
            job.setdefault("frames", facts.get("frames"))
    log = Path(args.cluster_log).read_text(errors="replace") if (
        args.cluster_log and Path(args.cluster_log).is_file()) else ""
    print()
    print("\n".join(summary_table(state)))
    for k, job in enumerate(state["jobs"], 1):
        status, why = job_status(job, state["steps"])
        if status in ("failed", "not-run"):
            print(f"{status}: {k}. {job['name']}: {why}")
    out = Path(state["output_dir"])
    if not out.is_dir():
        print(f"run.sh: note: {out} does not exist: no run record written", file=sys.stderr)
        return EXIT_OK
    record = run_record(state, args.exit_code, address, log)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = out / f"{RECORD_PREFIX}{stamp}.toml"
    n = 1
    while path.exists():
        n += 1
        path = out / f"{RECORD_PREFIX}{stamp}_{n}.toml"
    path.write_text(f"# PANOSETI L0 -> L1 run record written by run.sh\n"
                    f"{tomli_w.dumps(record)}")
    print(f"run record: {path}")
    return EXIT_OK


# --------------------------------------------------------------------------- demo


def loopback_interface() -> str:
    """The network interface holding 127.0.0.1 ("lo" on Linux, "lo0" on macOS), or ""."""
    try:
        import psutil
    except ImportError:
        return "lo" if Path("/sys/class/net/lo").exists() else ""
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == "127.0.0.1" for a in addresses):
            return name
    return ""


def cmd_demo_observation(args: argparse.Namespace) -> int:
    from panoseti_pipeline import synthetic as synthetic_obs

    root = Path(args.directory)
    root.mkdir(parents=True, exist_ok=True)
    run = synthetic_obs.make_observation(root, seed=args.seed, frames_per_file=args.frames,
                                         files_per_stream=2, products=("img16", "ph256"),
                                         faults=("missing_quabo", "partial_last"))
    print(run)
    return EXIT_OK


def cmd_demo_config(args: argparse.Namespace) -> int:
    """The shipped config with the Dask cluster bound to the loopback interface."""
    import tomli_w

    from panoseti_pipeline.config import load_config

    cfg = load_config(args.config)
    interface = loopback_interface()
    values = cfg.as_dict()
    values["cluster"]["interface"] = interface
    cfg = cfg.with_overrides("cluster", interface=interface)  # validated again
    Path(args.output).write_text(
        f"# Demo configuration written by run.sh --demo: {cfg.source} with\n"
        f"# [cluster] interface = {json.dumps(interface)} so that every Dask address stays\n"
        f"# on this machine's loopback interface.\n"
        f"# Check it: python3 pipeline_config.py check FILE\n"
        f"{tomli_w.dumps(values)}")
    print(args.output)
    return EXIT_OK


# --------------------------------------------------------------------------- small tools


def cmd_config_get(args: argparse.Namespace) -> int:
    from panoseti_pipeline.config import load_config

    section, _, name = args.key.partition(".")
    values = load_config(args.config).as_dict()
    if section not in values or name not in values[section]:
        raise ConfigError(f"{args.key}: no such key (SECTION.KEY, e.g. cluster.use_dask)")
    value = values[section][name]
    print(json.dumps(value) if not isinstance(value, str) else value)
    return EXIT_OK


def cmd_descendants(args: argparse.Namespace) -> int:
    """Process ids below PID (children first), for the cleanup of a hung manager."""
    import psutil

    try:
        children = psutil.Process(args.pid).children(recursive=True)
    except psutil.Error:
        return EXIT_OK
    for child in children:
        print(child.pid)
    return EXIT_OK


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="The Python side of run.sh.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="validate inputs, config, output; print the jobs")
    p.add_argument("inputs", nargs="*", help="PFF files, .pffd directories (or L0 stores)")
    p.add_argument("--config", required=True)
    p.add_argument("--output", required=True, help="the output (L1) directory")
    p.add_argument("--steps", default="1,2")
    p.add_argument("--l0-dir", default="")
    p.add_argument("--keep-l0", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--keep-going", action="store_true")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--state", help="write the state file here and print the plan for bash")
    mode.add_argument("--dry-run", action="store_true", help="print the plan for people")
    p.add_argument("--command-line", default="",
                   help="the run.sh command line (shell-quoted), for the run record")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("record", help="record the outcome of one step of one job")
    p.add_argument("state")
    p.add_argument("job", type=int)
    p.add_argument("step", type=int, choices=(1, 2))
    p.add_argument("status", choices=("ok", "failed", "interrupted"))
    p.add_argument("--exit-code", type=int, default=0)
    p.add_argument("--start", default="")
    p.add_argument("--end", default="")
    p.add_argument("--l0-removed", action="store_true")
    p.set_defaults(func=cmd_record)

    p = sub.add_parser("mark", help="mark a job interrupted between its steps")
    p.add_argument("state")
    p.add_argument("job", type=int)
    p.add_argument("mark", choices=("interrupted",))
    p.set_defaults(func=cmd_mark)

    p = sub.add_parser("summary", help="print the table, write the run record")
    p.add_argument("state")
    p.add_argument("--exit-code", type=int, required=True)
    p.add_argument("--cluster-address", default="")
    p.add_argument("--cluster-log", default="")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("demo-observation", help="write the demo's small observation")
    p.add_argument("directory")
    p.add_argument("--frames", type=int, default=3000, help="frames per file")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo_observation)

    p = sub.add_parser("demo-config", help="write the demo's config (loopback cluster)")
    p.add_argument("config")
    p.add_argument("output")
    p.set_defaults(func=cmd_demo_config)

    p = sub.add_parser("config-get", help="print one config value (SECTION.KEY)")
    p.add_argument("config")
    p.add_argument("key")
    p.set_defaults(func=cmd_config_get)

    p = sub.add_parser("descendants", help="print the process ids below PID")
    p.add_argument("pid", type=int)
    p.set_defaults(func=cmd_descendants)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(lambda: args.func(args), "run.sh", args.debug)


if __name__ == "__main__":
    sys.exit(main())
