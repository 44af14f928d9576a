"""Where and when a run's tasks ran, how busy its worker threads were, and its timeline.

Every task of step 1 and step 2 reports its host, process, thread, start and end
(:func:`panoseti_pipeline.runners.timed`); each step process leaves its tasks, with the
worker threads it had, in a file run.sh names per step (:data:`TASK_FILE_PREFIX`), and
``driver record`` moves them into the job's step in the state. From all of them:

* the utilization of the run, busy thread-seconds / (worker threads x the wall time
  from the first task's start to the last task's end), on the summary and in the run
  record. The worker threads are counted once per pool: the threads of a Dask cluster
  (every step uses the same one), or a host's CPUs (local steps, also when several run
  side by side, each with its share);
* the tasks file beside the run record (``run_tasks_<UTC time>.json``): a night has
  thousands of tasks, too many for a record people read;
* the timeline PNG (``run_timeline_<UTC time>.png``): one row per worker thread, one bar
  per task, coloured by product, hatched by step.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from panoseti_pipeline.store.safe_write import write_file

#: run.sh's file of step STEP of job JOB in its temporary directory (beside the state
#: file): ``tasks_<JOB>_<STEP>.json`` (run_step sets it as PANOSETI_TASK_FILE)
TASK_FILE_PREFIX = "tasks_"
TASKS_PREFIX = "run_tasks_"  # beside the run record, the same UTC time
TIMELINE_PREFIX = "run_timeline_"


def step_task_file(state_path: str | os.PathLike[str], job: int, step: int) -> Path:
    """Where run.sh had step ``step`` of job ``job`` leave its tasks."""
    return Path(state_path).parent / f"{TASK_FILE_PREFIX}{job}_{step}.json"


def read_step_tasks(path: Path) -> dict[str, Any]:
    """What a step process left in its task file: ``mode``, ``pool``, ``threads``,
    ``tasks``; {} when it left none (it failed before a task ran, or was killed) or one
    that does not read (a warning: the step's outcome is recorded all the same)."""
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
        return {k: found[k] for k in ("mode", "pool", "threads", "tasks")}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError) as err:
        print(f"run.sh: warning: {path}: not a step's task record ({err!r}); its tasks "
              "are left out of the utilization", file=sys.stderr)
        return {}


def run_tasks(state: dict[str, Any]) -> list[dict[str, Any]]:
    """Every task of the run, with its input's name and index and its step, by start."""
    tasks = [{"input": job["name"], "job": k, "step": int(step), **task}
             for k, job in enumerate(state["jobs"])
             for step, entry in job.get("steps", {}).items()
             for task in entry.get("tasks", [])]
    return sorted(tasks, key=lambda t: t["start"])


def pool_threads(state: dict[str, Any]) -> dict[str, int]:
    """The worker threads of each pool the steps ran on (the most a step reported)."""
    pools: dict[str, int] = {}
    for job in state["jobs"]:
        for entry in job.get("steps", {}).values():
            if entry.get("tasks"):
                pools[entry["pool"]] = max(pools.get(entry["pool"], 0), entry["threads"])
    return pools


@dataclasses.dataclass(frozen=True)
class Utilization:
    """How busy the worker threads were between the first task's start and the last
    task's end."""

    busy_thread_s: float  # the tasks' durations, summed
    threads: int
    wall_s: float
    tasks: int

    @property
    def value(self) -> float:
        return self.busy_thread_s / max(self.threads * self.wall_s, 1e-9)

    def line(self) -> str:
        return (f"cluster utilization: {self.value:.2f} (busy {self.busy_thread_s:.1f} "
                f"thread-s / {self.threads} threads x {self.wall_s:.1f} s; "
                f"{self.tasks} tasks)")

    def as_dict(self) -> dict[str, Any]:
        return {"value": round(self.value, 4), "busy_thread_s": round(self.busy_thread_s, 3),
                "threads": self.threads, "wall_s": round(self.wall_s, 3), "tasks": self.tasks}


def utilization(state: dict[str, Any]) -> Utilization | None:
    """The run's utilization; None when no task ran."""
    tasks = run_tasks(state)
    if not tasks:
        return None
    wall = max(t["end"] for t in tasks) - tasks[0]["start"]
    return Utilization(sum(t["end"] - t["start"] for t in tasks),
                       sum(pool_threads(state).values()), wall, len(tasks))


def tasks_document(state: dict[str, Any], record_name: str) -> dict[str, Any]:
    """The tasks file beside the run record ``record_name``."""
    return {"run_record": record_name, "pools": pool_threads(state),
            "tasks": [{k: v for k, v in t.items() if k != "job"} for t in run_tasks(state)]}


# --------------------------------------------------------------------------- timeline

STEP_HATCH = {1: "", 2: "////"}
_MAX_ROWS_TALL = 40  # rows beyond: the figure stops growing, the bars get thinner


def _row_label(task: dict[str, Any]) -> str:
    return f"{task['host']}/{task['pid']}/{task['thread']}"


def _short(name: str) -> str:
    """A product's name in the legend: from its data product on (the run is the same)."""
    at = name.find("dp_")
    return name[at:] if at >= 0 else name[-40:]


def draw_timeline(state: dict[str, Any], out: Path) -> Path | None:
    """The timeline PNG of the run's tasks (None when no task ran)."""
    tasks = run_tasks(state)
    if not tasks:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display: batch jobs, SSH sessions
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = sorted({_row_label(t) for t in tasks})
    row_of = {label: i for i, label in enumerate(rows)}
    t0 = tasks[0]["start"]
    colours = matplotlib.colormaps["tab20" if len(state["jobs"]) > 10 else "tab10"]
    used = sorted({t["job"] for t in tasks})
    fig, ax = plt.subplots(figsize=(11, 2.5 + 0.3 * min(len(rows), _MAX_ROWS_TALL)),
                           layout="constrained")
    try:
        for t in tasks:
            ax.barh(row_of[_row_label(t)], t["end"] - t["start"], left=t["start"] - t0,
                    height=0.8, color=colours(t["job"] % colours.N), edgecolor="black",
                    linewidth=0.3, hatch=STEP_HATCH[t["step"]])
        ax.set_yticks(range(len(rows)), rows, fontsize=7 if len(rows) < 30 else 5)
        ax.invert_yaxis()
        ax.set_xlabel("seconds since the first task started")
        ax.set_ylabel("worker thread (host/pid/thread)")
        found = utilization(state)
        ax.set_title(f"tasks of the run: {found.line() if found else ''}", fontsize=9)
        legend = [Patch(facecolor=colours(k % colours.N),
                        label=f"{k + 1}. {_short(state['jobs'][k]['name'])}") for k in used[:20]]
        legend += [Patch(facecolor="white", edgecolor="black", hatch=h,
                         label=f"step {s}") for s, h in STEP_HATCH.items()]
        ax.legend(handles=legend, fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1))
        write_file(out, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)
    return out
