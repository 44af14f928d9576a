"""The run's plan: inputs -> jobs, and every check made before any work.

:func:`make_plan` validates everything ``run.sh`` needs and lists the jobs: every input
exists, is readable and has a PFF name (a ``.pffd`` directory expands to its streams: one
job per (dp, module), seqno files in order, 0-byte files and ``hk.pff`` skipped with a
notice); the config is valid; the network interface of a local or SLURM cluster exists
here; the workers' scratch (``local_directory``) is outside the output tree; the output
and L0 directories are writable and outside the input tree; the free space is enough for
the L0 + L1 estimate. Problems are collected, never raised, so that all are reported at once.

The plan is printed for people (:func:`print_dry_run`) or for bash (:func:`bash_lines`):
one line per record, fields separated by the ASCII unit separator (US, ``\x1f``): unlike a
TAB, bash's ``read`` never merges two of them, so an empty field (a job named ``""``
from ``_L0.zarr``) keeps every later field in its column. Paths with a control character
(TAB, newline, US, ...) are refused::

    cluster <US> 0|1 <US> seconds to wait for the scheduler file <US> description
    stop    <US> tenths of a second a step or the cluster manager gets after SIGTERM
    l0dir   <US> directory of the L0 stores <US> 1 if it is the pipeline's own scratch
                 directory (<output>/.l0_tmp: removed when empty), else 0
    umask   <US> octal umask for the files of the run ([run] group_writable)
    lanes   <US> products in flight at once <US> CPUs of each local step process (0: all)
    job     <US> index <US> run|skip <US> name <US> L0 path <US> L1 path|- <US> input ...
    bundle  <US> run directory (.pffd), or a bundle of it <US> its product directory

Products of a ``.pffd`` run go into their own directory, ``<output>/<run name>/``, beside
the run's bundle (``<run>.pffd.panoseti-meta``): PANOSETI's reader
(``pypff.zarr.open_zarr_run``) keys the stores of a directory by data product and module
only, so two runs in one directory would hide each other's products. So do the L1 stores
``--steps 2`` makes of a run's L0 stores (the run named in their attributes; the bundle
from the one beside them).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from panoseti_pipeline.cluster.client import startup_wait_s
from panoseti_pipeline.errors import ConfigError
from panoseti_pipeline.store import publish as store_files
from panoseti_pipeline.store.analysis_spec import LEVEL_DIRS

if TYPE_CHECKING:
    from panoseti_pipeline.config import PipelineConfig

L0_SUFFIX = "_L0.zarr"
L1_SUFFIX = "_L1.zarr"
ANALYSIS_L0_DIR, ANALYSIS_L1_DIR = LEVEL_DIRS  # l1_layout = "panoseti_analysis": levels
BPP_FIELD = re.compile(r"\.bpp_\d+(?=\.module_)")  # not in the team's store names
#: The L0 directory in the output directory when none is configured: the pipeline's own
#: scratch for the L0 stores it removes after step 2, or, with --keep-l0, "L0".
SCRATCH_L0_SUBDIR = ".l0_tmp"
KEPT_L0_SUBDIR = "L0"
# Bytes per frame an L1 store needs besides its float32 pixels (time, timestamps, flags,
# header fields of four quabos), before compression.
L1_FRAME_OVERHEAD = 96


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
    made_otherwise: str = ""  # a skipped product made with other settings: which
    run: str = ""  # the observation run: its products go into <output>/<run>/
    run_dir: str = ""  # what the run's bundle is made from: the .pffd, or a bundle


@dataclass
class Plan:
    """The jobs, and what stops the run (problems) or is only worth saying (notices)."""

    jobs: list[Job] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)


def parse_steps(text: str) -> tuple[int, ...]:
    """``--steps`` as a tuple: (1,), (2,) or (1, 2)."""
    steps = {"1": (1,), "2": (2,), "1,2": (1, 2), "12": (1, 2), "2,1": (1, 2)}.get(text)
    if steps is None:
        raise ConfigError(f"--steps {text}: expected 1, 2 or 1,2")
    return steps


# --------------------------------------------------------------------------- paths


FIELD_SEPARATOR = "\x1f"  # of the plan for bash (the module docstring)


def _bad_chars(path: str) -> str | None:
    """Why run.sh cannot carry ``path`` in its plan (a control character), or None."""
    if any(ord(c) < 0x20 or c == "\x7f" for c in path):
        return f"{path!r}: paths with a TAB, newline or other control character are not supported"
    return None


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


def _raw_data_problem(path: Path, what: str) -> str | None:
    """Why ``path`` may not be an output: it is, or lies inside, raw data (a ``.pffd``
    directory, or a directory holding PFF files). Forgetting the output argument makes
    the last input the output (``./run.sh ../two/*.pffd``), or the inputs' directory."""
    for d in [path, *path.parents]:
        if d.suffix == ".pffd":
            where = "is" if d == path else f"is inside {d}, which is"
            return (f"{path}: the {what} {where} a .pffd observation directory (raw data); "
                    "did you forget the output directory? It is the last argument")
        with contextlib.suppress(OSError), os.scandir(d) as entries:
            if any(e.name.endswith(".pff") and e.is_file() for e in entries):
                where = "holds" if d == path else f"is inside {d}, which holds"
                return (f"{path}: the {what} {where} PFF files (raw data); did you forget "
                        "the output directory? It is the last argument")
    return None


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


def images_shape(store: Path) -> list[int] | None:
    """The shape of a store's ``images`` array, read from its metadata (no zarr import)."""
    try:
        with open(store / "images" / "zarr.json", encoding="utf-8") as f:
            shape = json.load(f).get("shape")
    except (OSError, ValueError, AttributeError):
        return None
    return shape if isinstance(shape, list) else None


# --------------------------------------------------------------------------- jobs


def _l1_estimate(frames: int, pixels: int) -> int:
    return frames * (pixels * 4 + L1_FRAME_OVERHEAD)


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
    """One job per (dp, module) stream of an observation directory (pff.group_streams)."""
    from panoseti_pipeline import pff, run_bundle
    from panoseti_pipeline.errors import PFFNameError

    names, others = [], []
    for entry in sorted(directory.iterdir()):
        if entry.name == pff.HOUSEKEEPING_NAME:
            continue  # housekeeping: copied into the run bundle
        if entry.suffix != ".pff" or not entry.is_file():
            others.append(entry.name)
            continue
        if not os.access(entry, os.R_OK):
            plan.problems.append(f"{entry}: not readable (permission denied)")
            continue
        try:
            names.append(pff.parse_name(entry))
        except PFFNameError as err:
            plan.problems.append(str(err))
    bundled = set(run_bundle.bundle_files(directory).values())
    plan.problems += [f"{path}: not readable (permission denied): run metadata the run bundle "
                      "copies (and step 1 reads, *.json); make it readable or move it away"
                      for path in sorted(bundled) if not os.access(path, os.R_OK)]
    leaving = run_bundle.links_leaving(directory)
    plan.notices += [f"{link}: a link that leaves the run directory; not followed, not in "
                     "the run bundle" for link in leaving]
    ignored = [name for name in others
               if directory / name not in bundled and directory / name not in leaving]
    if ignored:
        shown = ", ".join(ignored[:3]) + (", ..." if len(ignored) > 3 else "")
        plan.notices.append(f"{directory}: {len(ignored)} entries that are neither PFF data "
                            f"nor run metadata ignored ({shown})")
    streams, problems = pff.group_streams(names)
    plan.problems.extend(problems)
    jobs = []
    stem = directory.name[: -len(".pffd")]
    for stream in streams:
        plan.notices.extend(stream.notices)
        files = stream.data_files
        for name in stream.files:
            if name not in files:
                plan.notices.append(f"{name.path}: empty (0 bytes), skipped")
        if files:
            bpp = files[0].product.bpp
            job = _stream_job(files, f"{stem}.dp_{stream.dp}.bpp_{bpp}.module_{stream.module}",
                              f"stream of {directory.name}")
            job.run, job.run_dir = stem, str(directory)
            jobs.append(job)
    if not jobs and not problems:
        plan.problems.append(f"{directory}: no PFF data in this .pffd directory (no non-empty "
                             "start_*.dp_*.module_*.seqno_*.pff file)")
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
    shape = images_shape(path) or [0, 0, 0]
    pixels = 1
    for s in shape[1:]:
        pixels *= s
    size = store_files.store_bytes(path)
    job = Job(name=stem, inputs=[str(path)], l0=str(path), l1="", input_bytes=size,
              est_l0_bytes=0, est_l1_bytes=_l1_estimate(shape[0], pixels), kind="L0 store")
    job.run, job.run_dir = _l0_run(path, plan)
    return job


def _l0_run(path: Path, plan: Plan) -> tuple[str, str]:
    """The observation run of an L0 store (its attributes) and the run bundle beside it
    (``run.sh --steps 1`` puts one there), so that its L1 goes into <output>/<run>/ with
    that bundle, as with ``--steps 1,2``; ("", "") for a store of no run."""
    from panoseti_pipeline import run_bundle
    from panoseti_pipeline.errors import InputError
    from panoseti_pipeline.store.facts import observation, read_root

    try:
        name = str(observation(read_root(path)[1].get("attributes") or {}).get("name", ""))
    except InputError:
        return "", ""
    run = name.removesuffix(".pffd")
    if not name.endswith(".pffd") or "/" in run or not run.strip("."):
        return "", ""
    bundle = path.parent / run_bundle.bundle_name(name)
    if not bundle.is_dir():
        plan.notices.append(f"{path}: no run bundle beside it ({bundle.name}): its L1 goes "
                            f"into the run's directory {run}/ without one")
        return run, ""
    return run, str(bundle)


def _input_jobs(inputs: Sequence[str], steps: tuple[int, ...], plan: Plan
                ) -> tuple[list[Job], list[Path]]:
    """Jobs of every input, and the input trees (directories the outputs must avoid)."""
    jobs: list[Job] = []
    trees: list[Path] = []
    seen: dict[Path, str] = {}
    for text in inputs:
        path = Path(os.path.abspath(text))
        if problem := _bad_chars(text):
            plan.problems.append(problem)
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


# --------------------------------------------------------------------------- resources


def _human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(nbytes) < 1000 or unit == "TB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.1f} TB"


def l1_path(out: Path, job: Job, cfg: PipelineConfig | None) -> Path:
    """Where a job's L1 goes: ``<output>/<run>/<name>_L1.zarr``, or with ``l1_layout =
    "panoseti_analysis"`` the team's level-major one (:func:`analysis_path`)."""
    if cfg and cfg.baseline_subtract.l1_layout == "panoseti_analysis":
        return analysis_path(out, job, ANALYSIS_L1_DIR)
    return out / job.run / f"{job.name}{L1_SUFFIX}"


def analysis_path(out: Path, job: Job, level: str) -> Path:
    """The team's level-major place of a job's store:
    ``<output>/<run>/<level>/<run>.dp_<p>.module_<m>.zarr`` (a lone file, of no run:
    ``<output>/<level>/<name>.zarr``)."""
    return out / job.run / level / f"{BPP_FIELD.sub('', job.name)}.zarr"


def free_space_problems(jobs: Sequence[Job], out_dir: Path, l0_dir: Path, steps: tuple[int, ...],
                        keep_l0: bool, in_flight: int = 1,
                        disk_usage: Callable[[str], Any] = shutil.disk_usage) -> list[str]:
    """Is there room for the jobs that will run? L1 stores stay; L0 stores are removed
    after each input unless kept or only step 1 runs: then at most ``in_flight`` of them
    (the products run at once) exist together, counted as the largest."""
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
        add(l0_dir, sum(l0_sizes) if kept else sum(sorted(l0_sizes)[-in_flight:]),
            "L0" if kept else f"L0 (the {min(in_flight, len(l0_sizes))} largest at once, "
                              "removed after each input)")
    if 2 in steps:
        add(out_dir, sum(j.est_l1_bytes for j in todo), "L1")
    problems = []
    for nbytes, base, parts in need.values():
        free = disk_usage(str(base)).free
        if nbytes > free:
            problems.append(f"{base}: not enough free space: about {_human(nbytes)} "
                            f"needed ({' + '.join(parts)}), {_human(free)} free")
    return problems


def _scratch_problem(cfg: PipelineConfig | None, path: Path, what: str) -> str | None:
    """The workers' scratch ([cluster] local_directory) must not be inside ``path``."""
    if cfg is None or not (cfg.cluster.use_dask and cfg.cluster.local_directory):
        return None
    scratch = cfg.cluster.local_directory
    expanded = os.path.expanduser(os.path.expandvars(scratch))
    if not (os.path.isabs(expanded) and _is_within(_real(expanded), _real(path))):
        return None
    return (f"{cfg.source}: [cluster] local_directory = {json.dumps(scratch)} is inside the "
            f"{what} {path}: the workers' scratch must stay out of the output tree "
            f"(choose node-local scratch, e.g. /scratch or $TMPDIR)")


def _interface_problem(interface: str, source: str) -> str | None:
    """A local cluster, or a SLURM cluster's scheduler, binds to ``interface`` on this
    machine: does it have it?"""
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


def _dashboard_problems(cluster: Any, source: str) -> list[str]:
    """``dashboard_port`` needs bokeh (not a requirement: only the dashboard uses it) and,
    where the scheduler runs on this machine, a free port on its address."""
    port = int(cluster.dashboard_port)
    if not (cluster.use_dask and port):
        return []
    problems = []
    if importlib.util.find_spec("bokeh") is None:
        problems.append(f"{source}: [cluster] dashboard_port = {port}: the dashboard needs "
                        f"bokeh, which is not installed in {sys.prefix} (pip install "
                        "'bokeh>=3.1' there), or set dashboard_port = 0")
    if cluster.cluster_type in ("local", "slurm"):
        host = "127.0.0.1"
        if cluster.interface:
            from panoseti_pipeline.cluster import interface_address

            host = interface_address(cluster.interface)
        with socket.socket() as probe:
            try:
                probe.bind((host, port))
            except OSError as err:
                problems.append(f"{source}: [cluster] dashboard_port = {port}: cannot listen "
                                f"on {host}:{port} ({err.strerror}; another dashboard?); "
                                "choose another port, or 0 for none")
    return problems


# --------------------------------------------------------------------------- the plan


def make_plan(inputs: Sequence[str], config_path: str, out_dir: str, *,
              steps: tuple[int, ...] = (1, 2), l0_dir: str = "", keep_l0: bool = False,
              overwrite: bool = False) -> tuple[Plan, PipelineConfig | None, Path, Path]:
    """Validate everything and list the jobs; problems are collected, never raised.

    Returns the plan, the config (None when it is invalid), the output directory and the
    L0 directory (both absolute).
    """
    from panoseti_pipeline.config import load_config

    plan = Plan()
    cfg = None
    if not config_path.endswith(".toml"):
        plan.problems.append(f"{config_path}: the config file must be a .toml file")
    try:
        cfg = load_config(config_path)
    except ConfigError as err:
        plan.problems.extend(err.problems)
    if cfg and cfg.cluster.use_dask and cfg.cluster.cluster_type in ("local", "slurm"):
        problem = _interface_problem(cfg.cluster.interface, cfg.source)
        if problem:
            plan.problems.append(problem)
    if cfg and not plan.problems:
        plan.problems += _dashboard_problems(cfg.cluster, cfg.source)
    if not inputs:
        plan.problems.append("no input given")
    jobs, trees = _input_jobs(inputs, steps, plan)
    out = Path(os.path.abspath(out_dir))
    if problem := _bad_chars(out_dir):
        plan.problems.append(problem)
    configured = l0_dir or (cfg.run.l0_dir if cfg else "")
    team = bool(cfg) and cfg.baseline_subtract.l1_layout == "panoseti_analysis"
    team_l0 = team and (steps == (1,) or (keep_l0 and not configured))  # in <run>/L0/
    if steps == (1,) or team_l0:
        l0 = out  # the L0 stores are products
    elif configured:
        l0 = Path(os.path.abspath(configured))
    else:
        l0 = out / (KEPT_L0_SUBDIR if keep_l0 else SCRATCH_L0_SUBDIR)
    for what, path in (("output directory", out), ("L0 directory", l0)):
        inside_out = what == "L0 directory" and _is_within(l0, out)  # out's problem
        raw = None if inside_out else _raw_data_problem(_real(path), what)
        problem = raw or _check_writable_dir(path, what)
        if problem:
            plan.problems.append(problem)
        real = _real(path)
        for tree in trees:
            if _is_within(real, tree):
                plan.problems.append(f"{path}: the {what} is inside the input tree {tree} "
                                     "(inputs are read-only; choose another directory)")
        problem = _scratch_problem(cfg, path, what)
        if problem:
            plan.problems.append(problem)
    if l0 != out and (problem := _bad_chars(str(l0))):
        plan.problems.append(problem)

    names: dict[str, str] = {}
    for job in jobs:
        if steps != (2,) and team_l0:
            job.l0 = str(analysis_path(out, job, ANALYSIS_L0_DIR))
        elif steps != (2,):
            where = l0 / job.run if steps == (1,) else l0  # products in their run's dir
            job.l0 = str(where / f"{job.name}{L0_SUFFIX}")
        if 2 in steps:
            job.l1 = str(l1_path(out, job, cfg))
        final = Path(job.l1 or job.l0)
        if job.name in names:
            plan.problems.append(f"{job.inputs[0]}: output name {final.name} is also the "
                                 f"output of {names[job.name]}")
        names[job.name] = job.inputs[0]
        level = "L1" if job.l1 else "L0"
        if not overwrite and store_files.is_published(final, level):
            job.action = "skip"
            job.made_otherwise = made_otherwise(final, cfg, steps) if cfg else ""
            if job.made_otherwise:
                plan.notices.append(f"{final}: complete product already there, skipped; "
                                    f"{job.made_otherwise}; --overwrite redoes it")
        elif final.exists() and not final.is_dir():
            plan.problems.append(f"{final}: exists and is not a Zarr store")
    plan.jobs = jobs
    if not plan.problems:
        in_flight = products_in_flight(cfg, sum(j.action == "run" for j in jobs))[0] if (
            cfg) else 1
        plan.problems.extend(free_space_problems(jobs, out, l0, steps, keep_l0, in_flight))
    return plan, cfg, out, l0


def made_otherwise(final: Path, cfg: PipelineConfig, steps: tuple[int, ...]) -> str:
    """How the product at ``final`` was made otherwise than ``cfg`` would make it now
    (``made with method = "median"; this config: method = "mean"``), from the settings
    its attributes record of the steps this run would do; "" when the same (or unsaid)."""
    from panoseti_pipeline.errors import InputError
    from panoseti_pipeline.store.facts import read_root

    try:
        attrs = read_root(final)[1].get("attributes") or {}
    except InputError:
        return ""
    l1 = attrs.get("processing_level") == "L1"
    made = [(cfg.baseline_subtract, attrs)] if l1 else []
    if 1 in steps:
        made.append((cfg.pff_to_zarr, attrs.get("l0") if l1 else attrs))
    diffs = []
    for section, where in made:
        config = where.get("config") if isinstance(where, dict) else None
        if isinstance(config, dict):
            diffs += section.differences(config.get(section.section) or {})
    if not diffs:
        return ""
    return (f"made with {', '.join(f'{k} = {then}' for k, then, _ in diffs)}; this config: "
            f"{', '.join(f'{k} = {now}' for k, _, now in diffs)}")


def cluster_summary(cfg: PipelineConfig) -> dict[str, Any]:
    """The cluster the run will use, for the plan, the state and the run record."""
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
    elif c.cluster_type == "slurm":
        info.update(jobs=c.slurm_jobs, workers=c.n_workers, cores_per_job=c.slurm_cores,
                    memory_per_job=c.slurm_memory, queue=c.slurm_queue,
                    walltime=c.slurm_walltime)
        shape = (f"{c.slurm_jobs} SLURM jobs x {c.slurm_processes} workers, "
                 f"{c.slurm_cores} cores and {c.slurm_memory} per job, partition "
                 f"{c.slurm_queue or '(default)'}, walltime {c.slurm_walltime}")
    else:
        info["scheduler_address"] = c.scheduler_address
        shape = f"the running scheduler at {c.scheduler_address}"
    where = f", interface {c.interface}" if c.interface else ""
    info["description"] = f"Dask {c.cluster_type} cluster: {shape}{where}"
    return info


def worker_threads(cfg: PipelineConfig) -> int:
    """The threads that run the steps' tasks: the cluster's worker threads, or (use_dask =
    false, or a scheduler started elsewhere, whose workers are unknown before it is
    asked) this machine's CPUs."""
    c = cfg.cluster
    per_worker = {"local": c.local_threads_per_worker, "ssh": c.ssh_threads_per_worker,
                  "slurm": max(1, c.slurm_cores // max(1, c.slurm_processes))}
    if c.use_dask and c.n_workers is not None:
        return c.n_workers * per_worker[c.cluster_type]
    from panoseti_pipeline.runners import host_cpus

    return host_cpus()


def products_in_flight(cfg: PipelineConfig, to_run: int) -> tuple[int, int]:
    """How many products run at once (``[run] concurrent_products``; 0: one per worker
    thread), never more than there are to run; and the CPUs each local step process
    gets (use_dask = false: this machine's, shared out; 0: all of them)."""
    threads = worker_threads(cfg)
    lanes = max(1, min(cfg.run.concurrent_products or threads, to_run))
    share = max(1, threads // lanes) if lanes > 1 and not cfg.cluster.use_dask else 0
    return lanes, share


# --------------------------------------------------------------------------- output


def print_dry_run(plan: Plan, cfg: PipelineConfig, out: Path, l0: Path,
                  steps: tuple[int, ...], keep_l0: bool) -> None:
    """The plan for people (``run.sh --dry-run``), on stdout."""
    n_run = sum(j.action == "run" for j in plan.jobs)
    print(f"Plan (dry run: nothing is created, no cluster started); config {cfg.source}")
    print(f"  steps:   {','.join(map(str, steps))}")
    print(f"  output:  {out}")
    if steps != (2,) and l0 != out:
        kept = "kept (--keep-l0)" if keep_l0 else "removed after each input"
        print(f"  L0 dir:  {l0} ({kept})")
    print(f"  cluster: {cluster_summary(cfg)['description']}")
    lanes, share = products_in_flight(cfg, n_run)
    shared = f", {share} CPU(s) each" if share else ""
    print(f"  at once: {lanes} input(s) in flight ([run] concurrent_products = "
          f"{cfg.run.concurrent_products}{shared})")
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


def bash_lines(plan: Plan, cfg: PipelineConfig, out: Path, l0: Path, umask: int
               ) -> list[str]:
    """The plan for run.sh (the module docstring gives the format); ``umask`` is the
    caller's current one."""
    wait_s = startup_wait_s(cfg.cluster)
    stop_tenths = max(1, round(cfg.run.stop_grace_s * 10))
    records = [
        ["cluster", str(int(cfg.cluster.use_dask)), str(wait_s),
         cluster_summary(cfg)["description"]],
        ["stop", str(stop_tenths)],
        ["l0dir", str(l0), str(int(l0 == out / SCRATCH_L0_SUBDIR))],
        ["umask", f"{store_files.permission_umask(cfg.run.group_writable, umask):04o}"],
        ["lanes", *map(str, products_in_flight(cfg, sum(j.action == "run" for j in plan.jobs)))],
    ]
    for k, j in enumerate(plan.jobs):
        records.append(["job", str(k), j.action, j.name, j.l0, j.l1 or "-", *j.inputs])
    for run_dir, product_dir in run_directories(plan.jobs).items():
        records.append(["bundle", run_dir, product_dir])
    return [FIELD_SEPARATOR.join(r) for r in records]


def run_directories(jobs: Sequence[Job]) -> dict[str, str]:
    """The bundle source (.pffd, or a bundle) of each run of the plan -> the directory of
    its products (and its bundle)."""
    return {j.run_dir: str(Path(j.l1 or j.l0).parent) for j in jobs if j.run_dir}
