"""``run.sh --demo``: a small synthetic observation and a config that stays on this machine."""

from __future__ import annotations

import json
import socket
from pathlib import Path

#: Frames per file of the demo observation (two files per stream).
DEMO_FRAMES = 3000


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


def write_demo_observation(directory: Path, frames: int = DEMO_FRAMES, seed: int = 0) -> Path:
    """An img16 and a ph256 stream of two files each, with a missing quabo and a partial
    last frame; returns the ``.pffd`` directory."""
    from panoseti_pipeline import synthetic

    directory.mkdir(parents=True, exist_ok=True)
    return synthetic.make_observation(directory, seed=seed, frames_per_file=frames,
                                      files_per_stream=2, products=("img16", "ph256"),
                                      faults=("missing_quabo", "partial_last", "bad_pixels"))


def write_demo_config(config: str, output: Path | None) -> None:
    """``config`` with the Dask cluster bound to the loopback interface, as ``output``
    (None: on stdout, e.g. to check it without writing)."""
    import tomli_w

    from panoseti_pipeline.config import load_config

    cfg = load_config(config)
    interface = loopback_interface()
    values = cfg.as_dict()
    values["cluster"]["interface"] = interface
    cfg = cfg.with_overrides("cluster", interface=interface)  # validated again
    text = (
        f"# Demo configuration written by run.sh --demo: {cfg.source} with\n"
        f"# [cluster] interface = {json.dumps(interface)} so that every Dask address stays\n"
        f"# on this machine's loopback interface.\n"
        f"# Check it: python3 -m panoseti_pipeline config check FILE\n"
        f"{tomli_w.dumps(values)}")
    if output is None:
        print(text, end="")
    else:
        output.write_text(text)
