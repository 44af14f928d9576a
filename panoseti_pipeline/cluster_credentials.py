"""Temporary TLS credentials for a Dask cluster the pipeline starts.

Without them any process that can reach the scheduler's port could submit code that runs
as the pipeline's user. Each cluster gets a fresh self-signed key and certificate
(distributed's ``Security.temporary()``), used as the CA and by every role (scheduler,
workers, clients): only a process that can read the key can connect.

Layout of a credentials directory (mode 0700, files 0600)::

    <directory>/cert.pem   certificate, also the CA every peer checks against
    <directory>/key.pem    private key

The cluster manager creates the directory beside its scheduler file, passes its path to
the steps through that file, and removes it when the cluster closes. Remote processes get
the same two files: SLURM workers from their job script (:func:`job_script_lines`), SSH
processes over the verified SSH connection (:func:`remote_write_command`).
"""

from __future__ import annotations

import os
import shlex
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from distributed import Security

CERT = "cert.pem"
KEY = "key.pem"


def create(parent: str | os.PathLike[str]) -> Path:
    """A new private directory in ``parent`` holding a fresh certificate and key."""
    from distributed import Security

    temporary = Security.temporary()
    directory = Path(tempfile.mkdtemp(prefix="dask_tls.", dir=parent))  # mode 0700
    try:
        for name, text in pems(temporary).items():
            fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)
    except BaseException:
        remove(directory)
        raise
    return directory


def pems(security: Security) -> dict[str, str]:
    """``{file name: PEM text}`` of an in-memory (temporary) ``Security``."""
    return {CERT: security.tls_ca_file, KEY: security.tls_client_key}


def read_pems(directory: str | os.PathLike[str]) -> dict[str, str]:
    """``{file name: PEM text}`` of a credentials directory."""
    return {name: (Path(directory) / name).read_text() for name in (CERT, KEY)}


def security(directory: str | os.PathLike[str]) -> Security:
    """The ``Security`` of every role (scheduler, worker, client) from ``directory``."""
    from distributed import Security

    cert, key = (str(Path(directory) / name) for name in (CERT, KEY))
    return Security(
        require_encryption=True,
        tls_ca_file=cert,
        tls_client_cert=cert,
        tls_client_key=key,
        tls_scheduler_cert=cert,
        tls_scheduler_key=key,
        tls_worker_cert=cert,
        tls_worker_key=key,
    )


def dask_config(directory: str) -> dict[str, object]:
    """Dask configuration making a process's default ``Security`` the one of
    ``directory`` (for remote processes, which get the configuration, not objects)."""
    cert, key = f"{directory}/{CERT}", f"{directory}/{KEY}"
    settings: dict[str, object] = {"distributed.comm.require-encryption": True,
                                   "distributed.comm.tls.ca-file": cert}
    for role in ("scheduler", "worker", "client"):  # leaf by leaf: the other TLS keys stay
        settings[f"distributed.comm.tls.{role}.cert"] = cert
        settings[f"distributed.comm.tls.{role}.key"] = key
    return settings


def remove(directory: str | os.PathLike[str]) -> None:
    """Remove a credentials directory this process created (gone already is fine)."""
    shutil.rmtree(directory, ignore_errors=True)


#: The job-script variable holding the job's own credentials directory on its node.
JOB_DIR_VAR = "PANOSETI_TLS_DIR"


def job_script_lines(directory: str | os.PathLike[str]) -> list[str]:
    """Job-script lines writing the credentials into a private directory of the job's
    node (``$PANOSETI_TLS_DIR``), removed when the job script ends (also on scancel).

    The key travels inside the job script, which SLURM shows to the job's owner and
    administrators only; no shared filesystem is needed.
    """
    lines = [
        f'{JOB_DIR_VAR}="$(mktemp -d)" || exit 1',
        f"trap 'rm -rf -- \"${JOB_DIR_VAR}\"' EXIT",
        "trap 'exit 143' TERM",
    ]
    for name, text in read_pems(directory).items():
        lines.append(f'(umask 077 && printf %s {shlex.quote(text)} > "${JOB_DIR_VAR}/{name}")'
                     " || exit 1")
    return lines


def job_worker_args() -> list[str]:
    """``dask worker`` options using the credentials :func:`job_script_lines` wrote."""
    cert, key = f'"${JOB_DIR_VAR}/{CERT}"', f'"${JOB_DIR_VAR}/{KEY}"'
    return ["--tls-ca-file", cert, "--tls-cert", cert, "--tls-key", key]


def remote_write_command(directory: str, name: str) -> str:
    """A shell command that writes its standard input to ``directory/name`` on a remote
    host (replacing it whole), first making ``directory`` with mode 0700; it fails,
    writing nothing, when ``directory`` exists but is not the SSH user's own directory."""
    d, target = shlex.quote(directory), shlex.quote(f"{directory}/{name}")
    part = shlex.quote(f"{directory}/.{name}.partial")
    return (
        f"umask 077 && mkdir -p -- {d} && test -d {d} && ! test -L {d} && test -O {d} && "
        f"chmod 700 -- {d} && cat > {part} && mv -f -- {part} {target}"
    )
