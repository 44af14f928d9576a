"""The README's and docs' examples, run as a user would type them (on a small generated run).

Each command below must stand verbatim in README.md or docs/*.md; the test then runs it
with the placeholders (FILE, my.toml, input.pff, ...) replaced by real paths. The Python
examples of the README run as they are written, their paths replaced.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from panoseti_pipeline import synthetic

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
DOCS = "\n".join([README, *(p.read_text() for p in sorted((REPO / "docs").glob("*.md")))])
CONFIG = "[cluster]\nuse_dask = false\n[pff_to_zarr]\ntime_chunk = 256\n" \
         "[baseline_subtract]\ncompute_chunk_size = 256\n"


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("readme")
    run = synthetic.make_observation(root / "in", frames_per_file=600, files_per_stream=2)
    (root / "my.toml").write_text(CONFIG)
    first = next(run.glob("*dp_img16*seqno_0.pff"))
    (root / "elsewhere").mkdir()
    return {"cwd": str(root / "elsewhere"), "run": str(run), "FILE_OR_DIR...": str(run),
            "my.toml": str(root / "my.toml"),
            "config.toml": str(root / "my.toml"), "input.pff": str(first),
            "output_L0.zarr": str(root / "a_L0.zarr"), "input_L0.zarr": str(root / "a_L0.zarr"),
            "output_L1.zarr": str(root / "a_L1.zarr"), "DIR": str(root / "synthetic"),
            "STORE...": str(root / "a_L1.zarr"), "[--out": "--out",
            "DIR]": str(root / "looks")}


def run(example: str, paths: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``example`` (which must be in README.md or docs/) with its placeholders replaced."""
    assert example in DOCS, f"not in README.md or docs/: {example}"
    argv = [paths.get(word, word) for word in example.split()]
    assert argv[0] == "python3"
    if argv[1].endswith(".py"):  # a top-level script, typed with its path from elsewhere
        argv[1] = str(REPO / argv[1])
    # from a directory outside the repository (and not its parent): the package is found
    # because the environment has it installed, not because it is the working directory
    return subprocess.run([sys.executable, *argv[1:]], cwd=paths["cwd"], capture_output=True,
                          text=True, timeout=300)


# in the order a user meets them; step 2 reads what step 1 wrote
COMMANDS = [
    ("python3 -m panoseti_pipeline config check my.toml", "config ok: "),
    ("python3 -m panoseti_pipeline config show my.toml", "[pff_to_zarr]"),
    ("python3 pff.py info FILE_OR_DIR...", "frames"),
    ("python3 -m panoseti_pipeline synthetic DIR", ".pffd"),
    ("python3 step1_pff_to_zarr.py input.pff output_L0.zarr config.toml", "600 frames"),
    ("python3 step2_dask_baseline.py input_L0.zarr output_L1.zarr --config config.toml",
     "L1 written"),
    ("python3 -m panoseti_pipeline quicklook STORE... [--out DIR]", "_L1.png"),
]


def test_the_readme_commands_run(paths: dict[str, str]) -> None:
    for example, expected in COMMANDS:
        done = run(example, paths)
        assert done.returncode == 0, (example, done.stderr)
        assert expected in done.stdout, (example, done.stdout)


@pytest.fixture(scope="module")
def l1(paths: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``run.sh`` on the generated run: the output directory (holds ``L1/<run>/``)."""
    out = tmp_path_factory.mktemp("readme_run") / "L1"
    done = subprocess.run(["bash", str(REPO / "run.sh"), paths["run"], str(out)],
                          cwd=paths["cwd"],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "CONFIG_FILE": paths["my.toml"]})
    assert done.returncode == 0, done.stderr
    return out


def python_example(section: str, which: int = 0) -> str:
    """The ``which``-th ```python block of the README section that starts with ``section``."""
    body = README.split(section, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, re.S)[which]


def test_the_readme_python_example_of_xarray_and_pypff_runs(paths: dict[str, str],
                                                        l1: Path) -> None:
    pytest.importorskip("pypff")
    code = python_example("## Opening it in xarray and pypff", 1)
    run_dir = l1 / Path(paths["run"]).name[: -len(".pffd")]
    (store,) = run_dir.glob("*dp_img16*_L1.zarr")
    code = code.replace('"run_L1.zarr"', repr(str(store)))
    code = re.sub(r'open_zarr_run\("[^"]+"\)', f"open_zarr_run({str(run_dir)!r})", code)
    code += "\nassert len(store) == 1200 and t_ns.dtype.kind == 'i'\nprint('example ok')\n"
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=paths["cwd"])
    assert ran.returncode == 0, ran.stderr
    assert "example ok" in ran.stdout


def test_the_readme_python_example_of_looking_at_a_night_runs(paths: dict[str, str],
                                                              tmp_path: Path) -> None:
    """One frame is one 32x32 image (the old example drew a histogram of a whole
    second); the light curve has one value per frame."""
    from panoseti_pipeline import pff
    from panoseti_pipeline.cli import step1, step2

    files = sorted(Path(paths["run"]).glob("*dp_img16*.pff"),
                   key=lambda p: pff.parse_name(p).seqno)
    l0, l1 = tmp_path / "n_L0.zarr", tmp_path / "n_L1.zarr"
    assert step1.main([*map(str, files), str(l0), paths["my.toml"], "--quiet"]) == 0
    assert step2.main([str(l0), str(l1), "--config", paths["my.toml"], "--quiet"]) == 0
    section = README.split("## Looking at a night", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    code = code.replace('"run_L1.zarr"', repr(str(l1)))
    code += ("\nassert frame.dims == ('y', 'x') and frame.shape == (32, 32)"
             "\nassert light_curve.sizes['time'] == 1200\nprint('night ok')\n")
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert "night ok" in ran.stdout
    for png in ("frame.png", "light_curve.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_the_finding_and_opening_examples_run(paths: dict[str, str], l1: Path) -> None:
    """The Python example runs verbatim in the directory holding ``L1``; the catalog and
    ``pff.py info STORE.zarr`` commands as written, on that output."""
    code = python_example("## Opening it in xarray and pypff")
    code += ("\nassert light_curve.sizes['time'] == 1200 and hv.size == 1\n"
             # the first 100 ms, every frame of them (the frames are ~1 ms apart)
             "span = img.time.values - t0\n"
             "n = first_100_ms.sizes['time']\n"
             "assert 99 <= n <= 101 and span[n - 1] < np.timedelta64(100, 'ms') <= span[n]\n"
             # between cuts as ds.sel does: the end "...:47" is the whole second 47
             "want = img.sel(time=slice('2024-07-25T04:34:46.5', '2024-07-25T04:34:47'))\n"
             "assert [leaf.dataset.sizes['time'] for leaf in night.leaves] == "
             "[want.sizes['time']] and want.sizes['time'] > 500\n"
             "print('example ok')\n")
    ran = subprocess.run([sys.executable, "-c", code], cwd=l1.parent, capture_output=True,
                         text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr
    assert "example ok" in ran.stdout and "/module_1/img16" in ran.stdout

    (store,) = l1.glob("*/*dp_img16*_L1.zarr")
    where = {**paths, "OUTPUT_ROOT": str(l1), "STORE.zarr": str(store)}
    done = run("python3 -m panoseti_pipeline catalog OUTPUT_ROOT --rebuild", where)
    assert done.returncode == 0 and done.stdout.count("_L1.zarr") == 2, done.stderr
    done = run("python3 pff.py info STORE.zarr", where)
    assert done.returncode == 0 and "level=L1 dp=img16 module=1 frames=1200" in done.stdout
