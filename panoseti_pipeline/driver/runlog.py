"""run.sh's log file: what its stderr shows, line by line with UTC timestamps.

``run.sh`` sends its stderr (its own messages and every step's) through this program:
each byte goes on to the terminal at once, unchanged (progress bars keep working), and
each line is also appended to the run's log beside its run record. Progress bar redraws
(carriage returns, terminal escapes) are reduced to the text last shown on that line, so
the log reads like a transcript.

    python3 -m panoseti_pipeline.driver.runlog LOG_FILE    # stdin -> stdout and LOG_FILE
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import sys
from typing import BinaryIO

from panoseti_pipeline.store.safe_write import open_new

_ESCAPES = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")


def log_line(raw: bytes) -> bytes | None:
    """The log's text for one line of output (None: nothing left to show)."""
    text = _ESCAPES.sub(b"", raw).rsplit(b"\r", 1)[-1].rstrip()
    if not text:
        return None
    stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z").encode() + b" " + text + b"\n"


def tee(log_path: str, src: int = 0, dst: int = 1) -> None:
    """Copy ``src`` to ``dst`` as it comes and its lines into ``log_path`` until EOF.

    The log is a new file (:func:`.safe_write.open_new`: never written through a link or
    into a file already there); when it cannot be created, a warning says so and the
    copy to ``dst`` goes on, so that run.sh's stderr keeps working. Carries on logging
    when ``dst`` goes away (a closed terminal), so that the log keeps what happened after.
    """
    try:
        log: BinaryIO | None = open_new(log_path)
    except OSError as err:
        os.write(dst, f"run.sh: warning: no run log: {log_path}: {err.strerror or err}\n"
                 .encode())
        log = None
    pending = b""
    show = True
    with log or contextlib.nullcontext():
        while chunk := os.read(src, 1 << 16):
            if show:
                try:
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(dst, view):]
                except OSError:
                    show = False
            *lines, pending = (pending + chunk).split(b"\n")
            if log:
                log.write(b"".join(filter(None, map(log_line, lines))))
        if log and pending and (last := log_line(pending)):
            log.write(last)


if __name__ == "__main__":
    tee(sys.argv[1])
