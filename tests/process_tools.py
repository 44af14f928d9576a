"""Process-tree checks shared by the tests that start run.sh and the steps."""

from __future__ import annotations

import contextlib
from pathlib import Path


def session_processes(sid: int) -> list[tuple[int, str]]:
    """Live processes (not zombies) whose session or process group is ``sid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        state, pgrp, session = fields[0], int(fields[2]), int(fields[3])
        if state != "Z" and sid in (pgrp, session):
            with contextlib.suppress(OSError):
                found.append((int(entry.name), (entry / "cmdline").read_bytes()
                              .replace(b"\0", b" ").decode(errors="replace")))
    return found
