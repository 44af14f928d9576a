"""The run's index.html in a real browser: headless Chromium (Debian's ``chromium``).

``run.sh`` runs a generated night (two modules, img16 and ph256); its products'
directory must hold a quicklook PNG per store and an ``index.html`` that shows, opened
from the filesystem with no server, one row per product and every PNG loaded. Skipped,
saying why, where Chromium is not installed; under CI (``CI`` set) that is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from process_tools import run_sh, start_or_skip

from panoseti_pipeline import synthetic

REPO = Path(__file__).resolve().parents[1]
CONFIG = """
[cluster]
use_dask = false
[pff_to_zarr]
time_chunk = 256
[baseline_subtract]
compute_chunk_size = 256
baseline_window = 100
"""
#: records, once every image has loaded or failed, each image's decoded width
PROBE = ('<script>window.addEventListener("load", () => {for (const i of document.images)'
         ' {i.setAttribute("data-natural-width", i.naturalWidth)}'
         ' document.body.setAttribute("data-probed", "yes")})</script>')


class ChromiumMissing(Exception):
    """No chromium binary here."""


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise ChromiumMissing("chromium is not installed (apt-get install chromium)")


def browse(*args: str) -> subprocess.CompletedProcess[str]:
    """Headless Chromium (root needs --no-sandbox); the DOM or screenshot it makes."""
    binary = start_or_skip(chromium, ChromiumMissing, "chromium", "index.html")
    return subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu",
                           "--hide-scrollbars", "--virtual-time-budget=10000", *args],
                          capture_output=True, text=True, timeout=120, check=True)


@pytest.fixture(scope="module")
def night(tmp_path_factory) -> tuple[Path, list[str], str]:
    root = tmp_path_factory.mktemp("index")
    run = synthetic.make_observation(root / "in", seed=2, modules=(1, 2),
                                     products=("img16", "ph256"), frames_per_file=300,
                                     files_per_stream=1, faults=("bad_pixels",))
    config = root / "c.toml"
    config.write_text(CONFIG)
    result = run_sh(run, root / "in" / ".." / "out", config=config,  # printed normalised
                    quicklook=True)
    assert result.returncode == 0, result.stderr
    assert "/../" not in result.stderr and "/../" not in result.stdout
    (record,) = (root / "out").glob("run_record_*.toml")
    log = tomllib.loads(record.read_text())["run"]["log"]
    assert log == os.path.abspath(log) and Path(log).parent == root / "out"
    assert f"log: {log}" in result.stderr
    # stderr into a pipe, as into a file or a SLURM -o: progress as lines, never redrawn
    assert "\r" not in result.stderr and re.search(r"^.*: 100% \(", result.stderr, re.M)
    products = root / "out" / run.name.removesuffix(".pffd")
    stores = sorted(p.name for p in products.glob("*_L1.zarr"))
    assert len(stores) == 4
    return products, stores, result.stdout


def test_a_png_beside_every_store_and_one_page(night):
    products, stores, _ = night
    for store in stores:
        png = products / f"{store.removesuffix('.zarr')}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (products / "index.html").read_text()
    assert page.count('<tr class="product') == 4
    record = next(products.parent.glob("run_record_*.toml"))
    assert f'href="../{record.name}"' in page
    timeline = record.with_name(record.name.replace("run_record_", "run_timeline_")
                                ).with_suffix(".png")
    assert timeline.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f'<img src="../{timeline.name}"' in page
    assert "file://" not in page and "/tmp/" not in page  # relative links only


def test_each_ratio_reads_the_same_in_the_summary_the_page_and_pff_info(night):
    """PFF/L0 and L1/L0 are each defined once (what the steps recorded in the stores):
    the run's summary table, index.html and ``pff.py info`` show the same two decimals."""
    import zarr

    products, stores, summary = night
    page = (products / "index.html").read_text()
    head = next(line for line in summary.splitlines() if "PFF/L0" in line).split()
    for store in stores:
        attrs = dict(zarr.open_group(str(products / store), mode="r").attrs)
        pff_l0 = f"{attrs['l0']['report']['compression_ratio']:.2f}"
        l1_l0 = f"{attrs['size']['l1_to_l0_ratio']:.2f}"
        row = next(line.split() for line in summary.splitlines()
                   if store.removesuffix("_L1.zarr") in line)
        assert head[-6:-4] == ["PFF/L0", "L1/L0"]  # then "step1 s", "step2 s"
        assert row[-4:-2] == [pff_l0, l1_l0], row
        cells = re.search(rf'<tr class="product[^"]*" data-store="{re.escape(store)}">(.*?)</tr>',
                          page, re.S)
        assert cells and f">{pff_l0}<" in cells.group(1) and f">{l1_l0}<" in cells.group(1)
        info = subprocess.run([sys.executable, str(REPO / "pff.py"), "info",
                               str(products / store)], capture_output=True, text=True,
                              check=True).stdout
        assert f"PFF/L0 {pff_l0}" in info and f"L1/L0 {l1_l0}" in info


def test_chromium_shows_every_row_and_every_image(night, tmp_path):
    products, stores, _ = night
    probe = products / ".probe.html"  # beside the page: the same relative links
    probe.write_text((products / "index.html").read_text().replace("</body>",
                                                                  PROBE + "</body>"))
    try:
        dom = browse("--dump-dom", probe.as_uri()).stdout
    finally:
        probe.unlink()
    assert 'data-probed="yes"' in dom
    rows = re.findall(r'<tr class="product ok" data-store="([^"]+)"', dom)
    assert sorted(rows) == stores
    widths = re.findall(r'<img [^>]*data-natural-width="(\d+)"', dom)
    housekeeping = list(products.glob("*.housekeeping/*.hk.png"))  # the run's, if any
    # the quicklooks, the housekeeping and the timeline of the run's tasks
    assert len(widths) == 4 + len(housekeeping) + 1 and all(int(w) > 300 for w in widths)
    assert re.search(r'<img src="\.\./run_timeline_[^"]+\.png"[^>]*data-natural-width="'
                     r'[1-9]\d*"', dom)
    assert 'id="run-status"' in dom and "<b class=\"status-ok\">ok</b>" in dom
    shot = tmp_path / "page.png"
    browse("--window-size=1200,3000", f"--screenshot={shot}",
           (products / "index.html").as_uri())
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (3000, 1200)
    assert pixels[..., :3].std() > 0.05  # not blank: text, table and plots drawn
    assert (pixels[..., :3].std(axis=2) > 0.1).sum() > 10_000  # colour: the quicklooks


def test_pypff_lists_the_bundle_s_files_as_sidecars_and_the_products_only(night):
    """The bundle holds what pypff expects a sidecar folder to hold (configs, logs,
    sentinels, hk.pff, manifests, our manifest.json); the housekeeping store and PNG sit
    beside it, where neither list_sidecars nor list_products sees them."""
    import json

    pypff_zarr = pytest.importorskip("pypff.zarr", reason="pypff>=1.0.4 is not installed")
    products, stores, _ = night
    (bundle,) = products.glob("*.panoseti-meta")
    zrun = pypff_zarr.open_zarr_run(products)
    sidecars = [p.relative_to(bundle).as_posix() for p in zrun.list_sidecars()]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert sorted(sidecars) == sorted([*manifest["files"], "manifest.json"])
    assert "hk.pff" in sidecars and len(sidecars) < 30, sidecars
    assert {s.split("/")[0] for s in sidecars} <= {
        "configs", "logs", "manifests", "sentinels", "hk.pff", "manifest.json"}
    assert not any(".zarr" in s for s in sidecars)
    assert len(zrun.list_products()) == len(stores)
    (hk,) = products.glob("*.housekeeping/*.hk.zarr")
    assert manifest["housekeeping"]["directory"] == hk.parent.name
    assert (hk.parent / manifest["housekeeping"]["quicklook"]).is_file()


def test_no_quicklook_makes_neither(tmp_path):
    run = synthetic.make_observation(tmp_path / "in", products=("img16",),
                                     frames_per_file=200, files_per_stream=1)
    config = tmp_path / "c.toml"
    config.write_text(CONFIG)
    result = run_sh(run, tmp_path / "out", config=config)  # --no-quicklook
    assert result.returncode == 0, result.stderr
    products = tmp_path / "out" / run.name.removesuffix(".pffd")
    assert len(list(products.glob("*_L1.zarr"))) == 1
    assert not list(products.glob("*.png")) and not (products / "index.html").exists()
    assert not list((tmp_path / "out").glob("run_timeline_*"))  # nor the tasks' timeline
    assert list((tmp_path / "out").glob("run_tasks_*.json"))  # (recorded all the same)
    assert "quicklooks:" not in result.stderr
    (hk_dir,) = products.glob("*.housekeeping")  # the housekeeping store, without its PNG
    assert [p.suffix for p in hk_dir.iterdir()] == [".zarr"]


def test_after_an_all_skipped_rerun_the_page_shows_the_run_that_made_the_products(night):
    """A rerun skips every product; index.html still names the run that made them (its
    record, status and counts), and that rerun only as the latest run, which made none.
    Last in this file: it rewrites the night's page."""
    products, stores, _ = night
    root = products.parent.parent
    (first,) = root.glob("out/run_record_*.toml")
    (run,) = (root / "in").glob("*.pffd")
    result = run_sh(run, root / "out", config=root / "c.toml", quicklook=True)
    assert result.returncode == 0, result.stderr
    (rerun,) = set(root.glob("out/run_record_*.toml")) - {first}
    assert tomllib.loads(rerun.read_text())["run"]["counts"] == {"skipped": 4}
    # no task ran: no utilization, tasks file or timeline of the rerun
    assert "utilization" not in tomllib.loads(rerun.read_text())
    stamp = rerun.stem.removeprefix("run_record_")
    assert not list(rerun.parent.glob(f"run_t*_{stamp}.*"))
    made = tomllib.loads(first.read_text())["run"]
    page = (products / "index.html").read_text()
    runs = re.findall(r'<p class="run">(.*?)</p>', page, re.S)
    assert len(runs) == 2, runs
    assert runs[0].startswith("Made by run: <b class=\"status-ok\">ok</b>")
    assert "inputs: ok 4)" in runs[0] and f'href="../{first.name}"' in runs[0]
    assert f"started {made['started']}, finished {made['finished']}" in runs[0]
    assert runs[1].startswith("Latest run (made none of these products)")
    assert "inputs: skipped 4)" in runs[1] and f'href="../{rerun.name}"' in runs[1]
    cells = re.findall(r'<td class="made-by">(.*?)</td>', page)
    assert cells == [f'<a href="../{first.name}">{first.name}</a>'] * len(stores)
