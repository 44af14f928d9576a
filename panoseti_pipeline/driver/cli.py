"""``python3 -m panoseti_pipeline driver SUBCOMMAND``: the small CLI that ``run.sh`` calls.

``plan``
    Every check before any work; every problem listed at once on stderr (exit 2).
    Otherwise the plan for bash (``--state FILE``: also writes the state file) or for
    people (``--dry-run``). See :mod:`panoseti_pipeline.driver.plan`.
``record``, ``mark``
    One step's outcome (with where and when its tasks ran), or an interrupted job, into
    the state file.
``summary``
    The table and the utilization of the worker threads on stdout, and the run record
    (TOML, and its tasks file) in the output directory.
``finish``
    Everything after the jobs, in one process (each import paid once): the run bundles
    (``--bundle``), with ``l1_layout = "panoseti_analysis"`` each run's level
    ``manifest.json`` and ``.panoseti-meta/`` (:mod:`panoseti_pipeline.store.analysis_spec`),
    the summary and run record, the catalog (``<output>/catalog.sqlite``), then a quicklook
    PNG beside every product, the run's timeline PNG beside its record
    (:mod:`panoseti_pipeline.driver.tasks`) and an ``index.html`` in each directory of
    products (:mod:`panoseti_pipeline.driver.index_page`). A part that fails is one line and the
    others still run; a bundle or manifest not written fails the run.
``demo-observation``, ``demo-config``
    The small observation and the single-machine config of ``run.sh --demo``.
``clear-stale``
    What killed steps left beside products (partial stores, half-swapped products,
    transient L0 stores), when the process that held them is gone (``--pid``: or is that
    run.sh, done with them).
``prepare-l0``
    Before the jobs (``--steps 1,2``): each L0 store to make is marked transient, to be
    removed after step 2 by this run.sh (or kept, ``--keep-l0``; a store an earlier run
    kept is used and stays), and the transient L0 stores stopped runs left beside skipped
    products are removed.
``lock``
    The run locks of the output and L0 directories (``acquire``: exit 2 naming the holder
    when another live run has one; a stale one is taken over with a notice).
``descendants``
    The process ids below a process (run.sh's cleanup of a hung cluster manager).

Examples::

    python3 -m panoseti_pipeline driver plan --config config.toml --output /scratch/L1 \\
        --dry-run obs.pffd
    python3 -m panoseti_pipeline driver summary /tmp/panoseti_run.x/state.json --exit-code 0
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from panoseti_pipeline.driver import demo, plan, record, tasks
from panoseti_pipeline.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, reported, run_main

PROG = "python3 -m panoseti_pipeline driver"


def cmd_plan(args: argparse.Namespace) -> int:
    steps = plan.parse_steps(args.steps)
    the_plan, cfg, out, l0 = plan.make_plan(args.inputs, args.config, args.output, steps=steps,
                                            l0_dir=args.l0_dir, keep_l0=args.keep_l0,
                                            overwrite=args.overwrite)
    for notice in the_plan.notices:
        print(f"run.sh: note: {notice}", file=sys.stderr)
    if the_plan.problems:
        n = len(the_plan.problems)
        print(f"run.sh: error: {n} problem{'s' if n > 1 else ''} found before any work "
              "(nothing was started):", file=sys.stderr)
        for problem in the_plan.problems:
            print(f"run.sh: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    assert cfg is not None  # a config problem is a problem
    if args.dry_run:
        plan.print_dry_run(the_plan, cfg, out, l0, steps, args.keep_l0)
        return EXIT_OK
    options = {"keep_l0": args.keep_l0, "overwrite": args.overwrite,
               "keep_going": args.keep_going}
    state = record.new_state(the_plan, cfg, args.config, out, l0, steps, options,
                             args.command_line)
    record.write_state(args.state, state)
    umask = os.umask(0)
    os.umask(umask)
    print("\n".join(plan.bash_lines(the_plan, cfg, out, l0, umask)))
    return EXIT_OK


def cmd_record(args: argparse.Namespace) -> int:
    if args.release:  # the transient L0 first: the record says whether it is gone
        _clear_stale_or_warn([args.release], args.pid, args.debug)
    reason = ""
    if args.reason_file:
        lines = Path(args.reason_file).read_text(errors="replace").strip().splitlines()
        reason = lines[-1] if lines else ""
    step_tasks = tasks.read_step_tasks(tasks.step_task_file(args.state, args.job, args.step))
    with record.updating(args.state) as state:
        record.record_step(state, args.job, args.step, args.status, exit_code=args.exit_code,
                           start=args.start, end=args.end,
                           l0_removed=bool(args.release) and not Path(args.release).exists(),
                           reason=reason, tasks=step_tasks)
    return EXIT_OK


def cmd_mark(args: argparse.Namespace) -> int:
    with record.updating(args.state) as state:
        record.mark_job(state, args.job, args.mark)
    return EXIT_OK


def cmd_summary(args: argparse.Namespace) -> int:
    write_summary(args.state, args.exit_code, args.log, args.cluster_address, args.cluster_log)
    return EXIT_OK


def write_summary(state_file: str, exit_code: int, log: str, cluster_address: str,
                  cluster_log: str) -> None:
    """The table on stdout and the run record in the output directory (named in the state
    file, for the index pages)."""
    state = record.load_state(state_file)
    record.measure_skipped(state)
    manager_output = Path(cluster_log).read_text(errors="replace") if (
        cluster_log and Path(cluster_log).is_file()) else ""
    print()
    print("\n".join(record.summary_table(state)))
    busy = tasks.utilization(state)
    if busy:
        print(busy.line())
    for line in record.failure_lines(state) + record.warning_lines(state):
        print(line)
    out = Path(state["output_dir"])
    if not out.is_dir():
        print(f"run.sh: note: {out} does not exist: no run record written", file=sys.stderr)
        return
    the_record = record.run_record(state, exit_code, cluster_address, manager_output)
    if log:
        the_record["run"]["log"] = log
    path = record.write_run_record(out, the_record, state)
    print(f"run record: {path}")
    state["run_record"] = str(path)
    record.write_state(state_file, state)


def cmd_finish(args: argparse.Namespace) -> int:
    """After the jobs: bundles, level manifests, summary, catalog, quicklooks (in this
    order: the summary's exit status counts a bundle not written, the index pages link the
    run record). EXIT_FAILED if the run failed (``--failed`` jobs, or a bundle or manifest
    not written)."""
    def part(body: Callable[[], int | None]) -> bool:
        return reported(lambda: body() or EXIT_OK, "run.sh", args.debug) == EXIT_OK

    failed = args.failed
    for run_dir, product_dir in args.bundle:
        if Path(product_dir).is_dir() and not part(  # else no product of that run was made
                lambda r=run_dir, d=product_dir: _write_bundle(r, d, args.state,
                                                               not args.no_quicklook)):
            print(f"run.sh: error: the run bundle of {run_dir} was not written", file=sys.stderr)
            failed += 1
    if not part(lambda: _write_analysis_levels(args.state)):
        print("run.sh: error: the level manifests of the team's layout were not written",
              file=sys.stderr)
        failed += 1
    exit_code = EXIT_FAILED if failed else EXIT_OK
    if not part(lambda: write_summary(args.state, exit_code, args.log, args.cluster_address,
                                      args.cluster_log)):
        print("run.sh: warning: could not write the summary or run record", file=sys.stderr)
    if not part(lambda: _update_catalog(args.state)):
        print("run.sh: warning: could not update the catalog", file=sys.stderr)
    if not args.no_quicklook and not part(lambda: _make_quicklooks(args.state)):
        print("run.sh: warning: some quicklooks were not made (above)", file=sys.stderr)
    return exit_code


def _team_layout(state: dict) -> bool:
    """Whether the run's config says ``l1_layout = "panoseti_analysis"``."""
    from panoseti_pipeline.config import load_config

    return load_config(state["config_file"]).baseline_subtract.l1_layout == "panoseti_analysis"


def _write_bundle(run_dir: str, product_dir: str, state_file: str, quicklook: bool) -> None:
    """The run bundle of a run beside its products (those published there), from its
    .pffd directory or from a bundle of it (``--steps 2``); in the team's layout the run's
    housekeeping stores go into its ``L0/`` level; the housekeeping PNG only with
    ``quicklook``."""
    from panoseti_pipeline import run_bundle
    from panoseti_pipeline.store import publish

    out = Path(product_dir)
    stores = sorted(p for p in out.glob("*.zarr")
                    if publish.is_published(p, "L1") or publish.is_published(p, "L0"))
    products = [run_bundle.summarize_store(p) for p in stores]
    level = (out.name in (plan.ANALYSIS_L0_DIR, plan.ANALYSIS_L1_DIR)
             and _team_layout(record.load_state(state_file)))
    path = run_bundle.write_bundle(run_dir, out, products,
                                   notice=lambda msg: print(f"run.sh: note: {msg}",
                                                            file=sys.stderr),
                                   hk_level=out.parent / plan.ANALYSIS_L0_DIR if level else None,
                                   quicklook=quicklook)
    print(f"run.sh: run bundle: {path}", file=sys.stderr)


def _write_analysis_levels(state_file: str) -> None:
    """With ``l1_layout = "panoseti_analysis"``: each level directory of a run (``L1``,
    and ``L0`` when its stores are kept there or it holds the run's housekeeping stores)
    gets the team's ``manifest.json`` and ``.panoseti-meta/`` (a copy of the run's
    bundle)."""
    from panoseti_pipeline import run_bundle
    from panoseti_pipeline.housekeeping import find_hashset_stores
    from panoseti_pipeline.store import analysis_spec, publish

    state = record.load_state(state_file)
    if not _team_layout(state):
        return
    out = Path(state["output_dir"])
    levels = {Path(j[key]).parent: key.upper() for j in state["jobs"] for key in ("l0", "l1")
              if j[key] and Path(j[key]).parent.name == key.upper()
              and Path(j[key]).parent.parent != out}  # a run's level, not a lone file's
    for run in {d.parent for d in levels}:  # housekeeping: in L0/, kept or not
        if find_hashset_stores(run / plan.ANALYSIS_L0_DIR):
            levels[run / plan.ANALYSIS_L0_DIR] = "L0"
    l0_sums = {}  # the L0 checksums step 2 computed, not read again
    for level_dir in (d for d, level in levels.items() if level == "L1"):
        for store in level_dir.glob("*.zarr"):
            for path, checksum in analysis_spec.source_checksums(store).items():
                l0_sums[path] = checksum
    for level_dir, level in sorted(levels.items()):
        stores = [p for p in level_dir.glob("*.zarr") if publish.is_published(p, level)]
        stores += find_hashset_stores(level_dir) if level == "L0" else []
        if not stores:
            continue
        run = level_dir.parent.name
        name = run_bundle.bundle_name(f"{run}.pffd")
        bundles = [d / name for d in (level_dir, level_dir.parent / plan.ANALYSIS_L1_DIR)
                   if (d / name).is_dir()]
        path = analysis_spec.write_level(level_dir, run, level, stores,
                                         bundles[0] if bundles else None,
                                         publish.utc_now(), l0_sums)
        print(f"level manifest: {path}")


def _update_catalog(state_file: str) -> None:
    """The run's products into the output root's catalog (rows of the same path replaced)."""
    from panoseti_pipeline.catalog import update_from_state

    state = record.load_state(state_file)
    if not Path(state["output_dir"]).is_dir():
        return
    path, n = update_from_state(state)
    print(f"catalog: {path} ({n} product{'s' if n != 1 else ''} of this run)")


def _make_quicklooks(state_file: str) -> int:
    """A quicklook PNG beside every product of the run, an index.html per directory (their
    lines on stderr, with the run's log)."""
    from panoseti_pipeline.driver import index_page

    pages, failed = index_page.make_quicklooks(state_file)
    for page in pages:
        print(f"quicklooks: {page}", file=sys.stderr)
    return EXIT_FAILED if failed else EXIT_OK


def cmd_demo_observation(args: argparse.Namespace) -> int:
    print(demo.write_demo_observation(Path(args.directory), args.frames, args.seed))
    return EXIT_OK


def cmd_demo_config(args: argparse.Namespace) -> int:
    demo.write_demo_config(args.config, None if args.output == "-" else Path(args.output))
    print(args.output)
    return EXIT_OK


def cmd_clear_stale(args: argparse.Namespace) -> int:
    _clear_stale(*args.products, pid=args.pid)
    return EXIT_OK


def _clear_stale(*products: str, pid: int = 0) -> int:
    """What killed steps left beside these products, when their holder is gone (or is
    run.sh ``pid``, done with its transient L0 stores)."""
    from panoseti_pipeline.store import ownership, publish

    released = ownership.Holder.of(pid) if pid else None
    for final in products:
        for message in publish.clear_stale(final, released):
            print(f"run.sh: note: {message}", file=sys.stderr)
    return EXIT_OK


def _clear_stale_or_warn(products: list[str], pid: int, debug: bool) -> None:
    """:func:`_clear_stale`; a failure is its error line and a warning, not an exit."""
    if reported(lambda: _clear_stale(*products, pid=pid), "run.sh", debug) != EXIT_OK:
        print(f"run.sh: warning: could not clear the partial stores of {' '.join(products)}",
              file=sys.stderr)


def cmd_prepare_l0(args: argparse.Namespace) -> int:
    """Before the jobs: the L0 store of each job to run is transient (removed after step 2
    by run.sh ``--pid``) or kept (``--keep-l0``); a skipped job's transient L0 that a
    stopped run left is removed."""
    from panoseti_pipeline.store import ownership, publish

    state = record.load_state(args.state)
    holder = None if state["options"]["keep_l0"] else ownership.Holder.of(args.pid)
    for job in state["jobs"]:
        if job["action"] == "skip":
            messages = publish.clear_stale(job["l0"])
        else:
            messages = publish.hold_transient(job["l0"], holder)
        for message in messages:
            print(f"run.sh: note: {message}", file=sys.stderr)
    return EXIT_OK


def cmd_lock(args: argparse.Namespace) -> int:
    """Take or give back the run locks of these directories for run.sh (its pid); a
    directory inside one already locked needs none. All or none are taken (exit 2).
    Before a release, ``--clear-stale`` products are cleared as by ``clear-stale``."""
    from panoseti_pipeline.store import ownership

    if args.action == "release" and args.clear_stale:
        _clear_stale_or_warn(args.clear_stale, args.pid, args.debug)
    holder = ownership.Holder.of(args.pid)
    directories: list[Path] = []
    for d in map(Path, args.directories):
        if not any(d.resolve().is_relative_to(t.resolve()) for t in directories):
            directories.append(d)
    if args.action == "release":
        for d in directories:
            ownership.release(d / ownership.LOCK_NAME, holder)
        return EXIT_OK
    taken: list[Path] = []
    try:
        for d in directories:
            notice = ownership.acquire_lock(d, holder)
            taken.append(d)
            if notice:
                print(f"run.sh: note: {notice}", file=sys.stderr)
    except ownership.LockHeld:
        for d in taken:
            ownership.release(d / ownership.LOCK_NAME, holder)
        raise
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


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    from panoseti_pipeline.version import add_version_option

    parser = argparse.ArgumentParser(prog=prog, description="The Python side of run.sh.")
    add_version_option(parser)
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
    p.add_argument("--release", default="", metavar="L0",
                   help="first clear this transient L0 store of run.sh --pid (after step 2)")
    p.add_argument("--pid", type=int, default=0, help="run.sh, with --release")
    p.add_argument("--reason-file", default="", help="holds the failed step's error line")
    p.set_defaults(func=cmd_record)

    p = sub.add_parser("mark", help="mark a job interrupted between its steps")
    p.add_argument("state")
    p.add_argument("job", type=int)
    p.add_argument("mark", choices=("interrupted",))
    p.set_defaults(func=cmd_mark)

    p = sub.add_parser("summary", help="print the table, write the run record")
    p.add_argument("state")
    p.add_argument("--exit-code", type=int, required=True)
    _add_run_record_options(p)
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("finish", help="after the jobs: bundles, manifests, summary, catalog, "
                       "quicklooks")
    p.add_argument("state")
    p.add_argument("--failed", type=int, default=0, help="jobs that failed")
    p.add_argument("--bundle", nargs=2, action="append", default=[], metavar=("RUN", "DIR"),
                   help="write the bundle of run RUN (its .pffd, or a bundle of it) into DIR")
    p.add_argument("--no-quicklook", action="store_true")
    _add_run_record_options(p)
    p.set_defaults(func=cmd_finish)

    p = sub.add_parser("demo-observation", help="write the demo's small observation")
    p.add_argument("directory")
    p.add_argument("--frames", type=int, default=demo.DEMO_FRAMES, help="frames per file")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed: the same seed writes the same bytes (default 0)")
    p.set_defaults(func=cmd_demo_observation)

    p = sub.add_parser("demo-config", help="write the demo's config (loopback cluster)")
    p.add_argument("config")
    p.add_argument("output", help="the file to write; - prints it (a check, nothing written)")
    p.set_defaults(func=cmd_demo_config)

    p = sub.add_parser("clear-stale", help="clear what killed steps left beside products")
    p.add_argument("products", nargs="+", help="final product paths (<name>_L0.zarr, ...)")
    p.add_argument("--pid", type=int, default=0,
                   help="run.sh, done with its transient L0 stores among them")
    p.set_defaults(func=cmd_clear_stale)

    p = sub.add_parser("prepare-l0", help="mark the L0 stores transient (or kept)")
    p.add_argument("state")
    p.add_argument("--pid", type=int, required=True, help="run.sh, which removes them")
    p.set_defaults(func=cmd_prepare_l0)

    p = sub.add_parser("lock", help="take or release the run locks of directories")
    p.add_argument("action", choices=("acquire", "release"))
    p.add_argument("directories", nargs="+", help="the output and L0 directories")
    p.add_argument("--pid", type=int, required=True, help="the process holding it (run.sh)")
    p.add_argument("--clear-stale", nargs="+", default=[], metavar="PRODUCT",
                   help="release: first clear-stale these products (one process at exit)")
    p.set_defaults(func=cmd_lock)

    p = sub.add_parser("descendants", help="print the process ids below PID")
    p.add_argument("pid", type=int)
    p.set_defaults(func=cmd_descendants)
    return parser


def _add_run_record_options(p: argparse.ArgumentParser) -> None:
    """What the run record takes from run.sh (``summary``, ``finish``)."""
    p.add_argument("--cluster-address", default="")
    p.add_argument("--cluster-log", default="")
    p.add_argument("--log", default="", help="the run's log file (named in the run record)")


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)
    return run_main(lambda: args.func(args), "run.sh", args.debug)
