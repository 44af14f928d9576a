"""Step 1 on an SSH Dask cluster: 1 worker vs 2 workers, and the overhead vs local mode.

Usage: python3 bench/bench_ssh_step1.py [--mb 1024] [--repeat 2]

Starts a throwaway sshd on 127.0.0.1 and 127.0.0.2 (tests/sshd_testbed.py; needs
openssh-server, and root or a user sshd can run as), then times ``step1_pff_to_zarr.py``
(a child process, as run.sh runs it) on a generated img16 file (bench/benchlib.py
``big_file``) in three set-ups, each with the shipped [pff_to_zarr] settings:

* local: ``use_dask = false``, ``num_workers = 2`` (two threads in one process);
* ssh x1: SSH cluster on 127.0.0.1, 1 worker x 1 thread;
* ssh x2: SSH cluster on 127.0.0.1 and 127.0.0.2, 1 worker x 1 thread each.

Both clusters are started before and closed after the timed runs (as run.sh holds one
cluster for every input); the set-ups take turns, and each figure is the best of
``--repeat`` runs, as wall time of the step's process (imports, connecting, shipping the
modules included) and as the conversion's own time (its report in the store). Prints
the speedup ssh x2 / ssh x1 (target >= 1.6 on this 2-core machine) and the overhead of
ssh x2 against local mode.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from benchlib import REPO, big_file, loopback_sshd, run_child

sys.path.insert(0, str(REPO / "tests"))

import sshd_testbed  # noqa: E402

STEP1 = """
import json, pathlib, sys, time
from panoseti_pipeline.cli import step1 as step1_pff_to_zarr
t0 = time.perf_counter()
rc = step1_pff_to_zarr.main([*sys.argv[1:], "--quiet"])
seconds = time.perf_counter() - t0
meta = pathlib.Path(sys.argv[2], "zarr.json")
convert = json.loads(meta.read_text())["attributes"]["report"]["seconds"] if rc == 0 else 0
print(json.dumps({"rc": rc, "seconds": seconds, "convert_s": convert}))
"""


def write_config(path: Path, cluster: dict) -> Path:
    import tomli_w

    path.write_text(tomli_w.dumps({"cluster": cluster}))
    return path


def step1(pff: Path, out: Path, config: Path, cluster: Any) -> tuple[float, float]:
    """One step 1 run: (child wall time, the conversion's own time)."""
    shutil.rmtree(out, ignore_errors=True)
    args = [str(pff), str(out), str(config)]
    if cluster is not None:  # its address and the TLS credentials it accepts
        args += [cluster.address, "--dask-credentials", str(cluster.credentials)]
    result = run_child(STEP1, *args)
    shutil.rmtree(out, ignore_errors=True)
    if result["rc"] != 0:
        raise SystemExit(f"step 1 failed (exit {result['rc']}) with {config}")
    return result["seconds"], result["convert_s"]


def ssh_cluster(bed: sshd_testbed.SSHTestBed, hosts: list[str], tmp: Path) -> tuple[Any, Path]:
    """A started ClusterHandle with 1 worker x 1 thread on each of ``hosts``, its config."""
    from panoseti_pipeline import cluster as dask_cluster
    from panoseti_pipeline.config import load_config

    cluster = {"use_dask": True, "ssh_hosts": hosts, "ssh_workers_per_host": 1,
               "ssh_threads_per_worker": 1, "ssh_memory_per_worker": "3GB",
               "startup_timeout_s": 60.0, **bed.cluster_keys(sys.executable)}
    config = write_config(tmp / f"ssh{len(hosts)}.toml", cluster)
    return dask_cluster.ClusterHandle(load_config(config).cluster).start(), config


def stop_leftovers(bed: sshd_testbed.SSHTestBed) -> None:
    """Wait for the remote processes to end after the close; stop stragglers by PID."""
    left = bed.processes()
    for _ in range(100):
        if not left:
            return
        time.sleep(0.1)
        left = bed.processes()
    names = [" ".join(p.cmdline())[:100] for p in left]
    print(f"warning: still running after the clusters closed (stopped now): {names}",
          file=sys.stderr)
    sshd_testbed.stop_processes(left)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    pff = big_file(args.mb)
    mb = pff.stat().st_size / 1e6
    with loopback_sshd("bench_ssh_step1") as (tmp, bed), contextlib.ExitStack() as clusters:
        # Both clusters up at once, the set-ups interleaved: fairer on a busy machine.
        ssh1, one_cfg = ssh_cluster(bed, ["127.0.0.1"], tmp)
        clusters.callback(ssh1.close)
        ssh2, two_cfg = ssh_cluster(bed, ["127.0.0.1", "127.0.0.2"], tmp)
        clusters.callback(ssh2.close)
        local_cfg = write_config(tmp / "local.toml", {"use_dask": False})
        setups = {"local (2 threads)": (local_cfg, None), "ssh x1 worker": (one_cfg, ssh1),
                  "ssh x2 workers": (two_cfg, ssh2)}
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in setups}
        for _ in range(args.repeat):
            for name, (config, cluster) in setups.items():
                runs[name].append(step1(pff, tmp / "out_L0.zarr", config, cluster))
        clusters.close()
        stop_leftovers(bed)
    best = {name: min(times) for name, times in runs.items()}
    local, one, two = best.values()
    print(f"{mb:.0f} MB img16, step 1, best of {args.repeat}; wall = the step's process "
          f"(imports, connecting, shipping modules included), convert = its conversion")
    for name, (wall, conv) in best.items():
        print(f"  {name:18s} wall {wall:6.2f} s ({mb / wall:4.0f} MB/s)  "
              f"convert {conv:6.2f} s ({mb / conv:4.0f} MB/s)")
    print(f"speedup ssh 2 workers / 1 worker: wall {one[0] / two[0]:.2f}x, "
          f"convert {one[1] / two[1]:.2f}x (target >= 1.6)")
    print(f"overhead ssh 2 workers vs local 2 threads: wall {two[0] / local[0]:.2f}x "
          f"({two[0] - local[0]:+.2f} s), convert {two[1] / local[1]:.2f}x")


if __name__ == "__main__":
    main()
