"""A throwaway OpenSSH server on loopback, for the SSH-cluster tests and benchmark.

:func:`start_sshd` writes everything into one temporary directory -- a host key, a
client key pair, ``authorized_keys``, a ``known_hosts`` naming the server's key for every
listen address, and ``sshd_config`` -- and starts ``sshd -D -e`` listening on 127.0.0.1
and 127.0.0.2 (a second loopback address playing a second host) on one free port::

    bed = start_sshd(tmp_dir)          # raises SSHDUnavailable(reason) when it cannot
    try:
        keys = bed.cluster_keys()      # [cluster] keys that log in through it
        ...
        leftovers = bed.processes()    # what its sessions started and is still alive
    finally:
        bed.stop()                     # stops what its sessions left, then sshd, by PID

Every process started through this server carries ``SSH_CONNECTION`` in its environment
with this server's port as the last field (OpenSSH sets it in each session, and children
inherit it); :meth:`SSHTestBed.processes` finds them by that, whichever "host" they were
started on and even after they were re-parented. Nothing is stopped by name.

Notes
-----
* ``sshd`` needs ``/run/sshd`` (its privilege-separation directory); it is created when
  missing and we may.
* This server refuses SSH *signal* requests ("session signalling requires privilege
  separation"), so closing a remote process has to go through the process itself (the
  Dask scheduler retiring its workers), not through the channel.
* Not a pytest plugin: plain functions, usable from a benchmark too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HOSTS: tuple[str, ...] = ("127.0.0.1", "127.0.0.2")
SSHD_CANDIDATES = ("/usr/sbin/sshd", "/usr/local/sbin/sshd", "/sbin/sshd")
PRIVSEP_DIR = Path("/run/sshd")
START_TIMEOUT_S = 15.0


class SSHDUnavailable(RuntimeError):
    """sshd cannot be started here (not installed, no permission, ...); the why is the text."""


@dataclasses.dataclass
class SSHTestBed:
    """A running throwaway sshd and the files a client needs to log in through it."""

    directory: Path
    port: int
    hosts: tuple[str, ...]
    username: str
    client_key: Path
    known_hosts: Path
    #: A known_hosts naming a *different* key for the same hosts (an impostor's view).
    wrong_known_hosts: Path
    proc: subprocess.Popen | None = None

    @property
    def log(self) -> Path:
        return self.directory / "sshd.log"

    def cluster_keys(self, python: str | None = None) -> dict[str, Any]:
        """``[cluster]`` keys that log in through this server, every address on loopback.

        Only the test-bed keys: combine with the original pipeline's ``use_dask``,
        ``ssh_hosts``, ``ssh_*_per_*`` keys.
        """
        return {
            "ssh_port": self.port,
            "ssh_username": self.username,
            "ssh_client_keys": [str(self.client_key)],
            "ssh_known_hosts": str(self.known_hosts),
            "interface": "lo",
            "remote_python": python or sys.executable,
            "dashboard_port": 0,
        }

    def processes(self) -> list[Any]:
        """Live processes started through this server (its sessions' descendants)."""
        return session_processes(self.port)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace_s: float = 10.0) -> list[int]:
        """Stop what the sessions left running, then sshd itself; return the PIDs stopped."""
        stopped = stop_processes(self.processes(), grace_s)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=grace_s)
        # Sessions that were still being torn down when sshd stopped.
        stopped += stop_processes(self.processes(), grace_s)
        return stopped

    def __enter__(self) -> SSHTestBed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_sshd(directory: str | os.PathLike[str], hosts: tuple[str, ...] = HOSTS,
               timeout_s: float = START_TIMEOUT_S) -> SSHTestBed:
    """Start a throwaway sshd listening on ``hosts`` (loopback) with files in ``directory``.

    Raises :class:`SSHDUnavailable` saying why when it cannot (nothing is left running).
    """
    for host in hosts:
        if not host.startswith("127."):
            raise ValueError(f"the test sshd listens on loopback only, not {host!r}")
    sshd = next((c for c in SSHD_CANDIDATES if os.access(c, os.X_OK)), shutil.which("sshd"))
    if not sshd:
        raise SSHDUnavailable("sshd is not installed (apt-get install openssh-server)")
    if not shutil.which("ssh-keygen"):
        raise SSHDUnavailable("ssh-keygen is not installed (apt-get install openssh-client)")
    if not PRIVSEP_DIR.is_dir():
        try:
            PRIVSEP_DIR.mkdir(mode=0o755, parents=True)
        except OSError as err:
            raise SSHDUnavailable(f"cannot create {PRIVSEP_DIR} for sshd: {err}") from err

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    host_key, client_key, impostor_key = d / "host_ed25519", d / "id_ed25519", d / "impostor"
    for path in (host_key, client_key, impostor_key):
        _keygen(path)
    authorized = d / "authorized_keys"
    shutil.copyfile(client_key.with_suffix(".pub"), authorized)
    authorized.chmod(0o600)
    port = free_port(hosts)
    known, wrong = d / "known_hosts", d / "wrong_known_hosts"
    known.write_text(_known_hosts_lines(hosts, port, host_key))
    wrong.write_text(_known_hosts_lines(hosts, port, impostor_key))
    config = d / "sshd_config"
    config.write_text(_sshd_config(d, hosts, port, host_key, authorized))

    log = open(d / "sshd.log", "w")  # noqa: SIM115 -- handed to the child
    try:
        proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as err:
        raise SSHDUnavailable(f"cannot run {sshd}: {err}") from err
    finally:
        log.close()
    bed = SSHTestBed(d, port, tuple(hosts), getpass.getuser(), client_key, known, wrong, proc)
    deadline = time.monotonic() + timeout_s
    while not all(_listening(h, port) for h in hosts):
        if proc.poll() is not None or time.monotonic() > deadline:
            why = "exited" if proc.poll() is not None else f"not listening after {timeout_s:g} s"
            bed.stop()
            tail = " | ".join(bed.log.read_text().strip().splitlines()[-3:])
            raise SSHDUnavailable(f"sshd {why}: {tail or 'no output'}")
        time.sleep(0.05)
    return bed


def free_port(hosts: tuple[str, ...] = HOSTS) -> int:
    """A TCP port free on every one of ``hosts`` right now."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((hosts[0], 0))
            port = s.getsockname()[1]
        if all(_bindable(h, port) for h in hosts[1:]):
            return port
    raise SSHDUnavailable(f"no TCP port free on all of {', '.join(hosts)}")


def session_processes(port: int) -> list[Any]:
    """Live processes whose ``SSH_CONNECTION`` ends in ``port`` (an sshd on that port)."""
    import psutil

    suffix = f" {port}"
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            conn = proc.environ().get("SSH_CONNECTION", "")
            if conn.endswith(suffix) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
    return found


def session_host(proc: Any) -> str | None:
    """The server address a session process was started through (``SSH_CONNECTION``)."""
    import psutil

    try:
        fields = proc.environ().get("SSH_CONNECTION", "").split()
    except psutil.Error:
        return None
    return fields[2] if len(fields) == 4 else None


def stop_processes(procs: list[Any], grace_s: float = 10.0) -> list[int]:
    """SIGTERM, wait, SIGKILL: the given processes, by PID; return their PIDs."""
    import psutil

    procs = [p for p in procs if p.pid != os.getpid()]
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=grace_s)
    return [p.pid for p in procs]


# -- helpers ---------------------------------------------------------------------------


def _keygen(path: Path) -> None:
    for old in (path, path.with_suffix(".pub")):
        with contextlib.suppress(FileNotFoundError):
            old.unlink()
    cmd = ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "panoseti-test", "-f", str(path)]
    done = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise SSHDUnavailable(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.strip()}")


def _known_hosts_lines(hosts: tuple[str, ...], port: int, key: Path) -> str:
    kind, blob = key.with_suffix(".pub").read_text().split()[:2]
    return "".join(f"[{h}]:{port} {kind} {blob}\n" for h in hosts)


def _sshd_config(d: Path, hosts: tuple[str, ...], port: int, host_key: Path,
                 authorized: Path) -> str:
    lines = [f"ListenAddress {h}:{port}" for h in hosts] + [
        f"HostKey {host_key}",
        f"PidFile {d / 'sshd.pid'}",
        f"AuthorizedKeysFile {authorized}",
        "AuthenticationMethods publickey",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password",
        "StrictModes no",
        "UsePAM no",
        "UseDNS no",
        "PrintMotd no",
        "PermitUserEnvironment no",
        "AllowTcpForwarding no",
        "X11Forwarding no",
        "MaxStartups 50:30:100",
        "MaxSessions 50",
        "LogLevel VERBOSE",
    ]
    return "\n".join(lines) + "\n"


def _listening(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True
