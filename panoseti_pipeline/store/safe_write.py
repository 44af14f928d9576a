"""Creating the pipeline's small files (quicklook PNGs, index.html, run records, run logs,
holder files) without ever writing through what another user put at their name.

Their names are predictable, and an output directory may be group-writable: a link made
there (``X_L1.png -> victim.txt``) must not turn the pipeline into a writer of the link's
target. So a file is written whole into a new private name beside it (``O_CREAT|O_EXCL``
with ``O_NOFOLLOW``: created here, never through a link) and then renamed over its name
(a link there is replaced, its target untouched) or, for a file that must not replace
anything, hard-linked to it (fails when the name exists). A reader never sees it half
written. The mode is the caller's umask applied to 0666, as for any new file.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW


def write_file(path: str | os.PathLike, content: bytes | Callable[[BinaryIO], object], *,
               exclusive: bool = False) -> None:
    """Write ``content`` (bytes, or a function writing into the open binary file) as the
    file ``path``, replacing whatever is there; with ``exclusive``, FileExistsError when
    anything (a file, a link, a dangling link) is there already."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    fd = os.open(tmp, _NEW, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content)
        if exclusive:
            os.link(tmp, path, follow_symlinks=False)
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def open_new(path: str | os.PathLike) -> BinaryIO:
    """A new file at ``path`` opened for appending, unbuffered (a log); FileExistsError
    when anything is there already, a link included."""
    return os.fdopen(os.open(path, _NEW | os.O_APPEND, 0o666), "ab", buffering=0)


def new_file_mode() -> int:
    """The mode bits a new file gets here: 0666 with this process's umask applied (read
    from ``/proc/self/status``; setting the umask to read it would race other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            mask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):  # not Linux (>= 4.7)
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask
