"""Step 1 of this checkout writes the same chunk files as another checkout (e.g. main).

Usage: python3 bench/bench_step1_identical.py --ref-src /path/to/main/checkout [--mb 1024]

Runs ``step1_pff_to_zarr.py`` from each source tree (same interpreter, same input, the
bench config of ``bench_step1.py``) and compares every chunk and shard file byte for
byte, and the set of files. ``zarr.json`` files are compared without their attributes
(those record the software version and the run). Exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_step1 import write_config
from benchlib import OUT, REPO, big_file

STEP1 = ("import sys; from panoseti_pipeline.cli import step1; "
         "sys.exit(step1.main(sys.argv[1:]))")


def convert(src: Path, path: Path, out: Path, cfg: Path) -> None:
    """Step 1 with the package of source tree ``src``."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    subprocess.run([sys.executable, "-c", STEP1, str(path), str(out), str(cfg),
                    "--quiet"], cwd=src, env=env, check=True, stdout=subprocess.DEVNULL)


def digest(store: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file (``zarr.json`` without ``attributes``)."""
    found = {}
    for p in sorted(store.rglob("*")):
        if not p.is_file():
            continue
        data = p.read_bytes()
        if p.name == "zarr.json":
            meta = json.loads(data)
            meta.pop("attributes", None)
            meta.pop("consolidated_metadata", None)
            data = json.dumps(meta, sort_keys=True).encode()
        found[str(p.relative_to(store))] = hashlib.sha256(data).hexdigest()
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref-src", type=Path, required=True,
                        help="source tree to compare with (holds panoseti_pipeline/)")
    parser.add_argument("--mb", type=int, default=1024)
    parser.add_argument("--shard-factor", type=int, default=None,
                        help="override the shipped shard_factor (0: unsharded)")
    args = parser.parse_args()
    path = big_file(args.mb)
    with tempfile.TemporaryDirectory(dir=OUT if OUT.exists() else None) as tmp:
        tmp = Path(tmp)
        cfg = write_config(tmp, 2, args.shard_factor)
        convert(args.ref_src.resolve(), path, tmp / "ref_L0.zarr", cfg)
        convert(REPO, path, tmp / "ours_L0.zarr", cfg)
        ref, ours = digest(tmp / "ref_L0.zarr"), digest(tmp / "ours_L0.zarr")
    differ = sorted(k for k in ref.keys() & ours.keys() if ref[k] != ours[k])
    only = sorted(ref.keys() ^ ours.keys())
    print(f"{path.name}: {len(ref)} files in the reference store, {len(ours)} in ours; "
          f"{len(differ)} differ, {len(only)} in one store only")
    for k in differ[:10] + only[:10]:
        print(f"  {k}")
    return 1 if differ or only else 0


if __name__ == "__main__":
    sys.exit(main())
