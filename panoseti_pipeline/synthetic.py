"""Synthetic PANOSETI observations: realistic PFF files for tests, the demo and benchmarks.

Deterministic from a seed. Frames are written byte-exact by :func:`pff.write_frames`, with
White Rabbit or GNSS timing, and the awkward cases real files have, each opt-in:

* ``long_nsec``     a few frames with ``pkt_nsec >= 10**9`` (longer headers)
* ``clamped_nsec``  a few frames with ``pkt_nsec = 999999999`` (the DAQ's clamp)
* ``missing_quabo`` a few module frames without quabo 0 (zero sub-header and quadrant)
* ``out_of_order``  one frame whose time is 2 s earlier than the previous one (a suspect
  time axis: step 2 refuses it unless ``fail_on_suspect = false``)
* ``partial_last``  the last file of each stream ends in a partial frame
* ``bad_pixels``    hot pixels (about 1500 ADC above the pedestal, Poisson noise) and dead
  pixels (always 0) at the places :func:`bad_pixels` gives, in every frame

A run directory also gets what the DAQ writes besides data: its configs, hashpipe's log,
the sentinels and ``hk.pff`` (:func:`write_run_metadata`, :func:`write_housekeeping`).

Examples::

    python3 synthetic_obs.py /tmp/demo --frames 3000 --files-per-stream 2 --faults all
    python3 synthetic_obs.py /tmp/bench --single-file-mb 1024     # one big img16 file
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from panoseti_pipeline import pff
from panoseti_pipeline.run_bundle import SENTINELS

FAULTS = ("long_nsec", "clamped_nsec", "missing_quabo", "out_of_order", "partial_last",
          "bad_pixels")
HOT_PIXELS, DEAD_PIXELS = 3, 2  # planted per stream by the bad_pixels fault
HOT_EXCESS = 1500  # mean ADC counts a hot pixel reads above its pedestal
DEFAULT_START = dt.datetime(2024, 7, 25, 4, 34, 46, tzinfo=dt.timezone.utc)
GNSS_TAI_OFFSET = 517  # pkt_tai of a GNSS-timed board: unrelated to TAI (d far from 0)


@dataclasses.dataclass(frozen=True)
class StreamSpec:
    """What to generate for one (dp, module) stream."""

    dp: str = "img16"
    module: int = 1
    frames_per_file: int = 2000
    files: int = 2
    cadence_ns: int = 1_000_000  # image integration time; mean spacing for pulse-height
    timing: str = "wr"  # "wr" (White Rabbit) or "gnss"
    faults: frozenset[str] = frozenset()


def _true_times(rng: np.random.Generator, spec: StreamSpec, t0_ns: int, n: int) -> np.ndarray:
    if spec.dp.startswith("ph"):  # event-driven: random spacing
        steps = rng.exponential(spec.cadence_ns, n).astype(np.int64) + 1
        return t0_ns + np.cumsum(steps)
    return t0_ns + np.arange(n, dtype=np.int64) * spec.cadence_ns


def synth_headers(rng: np.random.Generator, spec: StreamSpec, time_ns: np.ndarray,
                  first_pkt: int) -> dict[str, np.ndarray]:
    """Header fields for frames taken at ``time_ns`` (true WR times)."""
    product = pff.PRODUCTS[spec.dp]
    n = len(time_ns)
    shape = (n, *product.header_shape)
    q = 1 if product.header_kind == "ph256" else pff.N_QUABOS
    jitter = rng.integers(-8, 9, size=(n, q)) * 4  # quabo clocks agree within tens of ns
    t = (time_ns[:, None] + jitter).reshape(shape)
    arrival = t + rng.integers(200_000, 400_000, size=shape)  # host receives later
    unix_sec = t // 1_000_000_000
    tai_offset = 37 if spec.timing == "wr" else 37 + GNSS_TAI_OFFSET
    headers = {
        "pkt_num": (first_pkt + np.arange(n)[:, None] + np.zeros((1, q), np.int64))
        .reshape(shape) % 65536,
        "pkt_tai": (unix_sec + tai_offset) % 1024,
        "pkt_nsec": t % 1_000_000_000,
        "tv_sec": arrival // 1_000_000_000,
        "tv_usec": (arrival // 1000) % 1_000_000,
    }
    if product.header_kind == "ph256":  # events of the four quabos interleave
        quabo = rng.integers(0, 4, n)
        for k in range(pff.N_QUABOS):  # each quabo counts its own packets
            mine = quabo == k
            headers["pkt_num"][mine] = (first_pkt + np.arange(mine.sum())) % 65536
        headers["quabo_num"] = quabo
    return headers


def synth_images(rng: np.random.Generator, spec: StreamSpec, n: int, first_frame: int
                 ) -> np.ndarray:
    """Pedestal + noise, a fixed star, and a flash in frames 150-154 of the stream."""
    product = pff.PRODUCTS[spec.dp]
    h, w = product.shape
    if spec.dp.startswith("ph"):  # pulse heights: signed, baseline removed on the board
        img = rng.normal(0, 40, (n, h, w))
        img[rng.random((n, h, w)) < 0.002] = -600  # real files hold values below -500
        img[:, h // 3, w // 3] += rng.integers(200, 3000, n)
        return np.clip(img, -32768, 32767).astype(product.dtype)
    top = 250 if spec.dp == "img8" else 4000
    pedestal = 40 + 10 * np.arange(h * w).reshape(h, w) % 30
    img = rng.poisson(pedestal, (n, h, w)).astype(np.int64)
    yy, xx = np.mgrid[:h, :w]
    img += (60 * np.exp(-((yy - 9) ** 2 + (xx - 21) ** 2) / 3.0)).astype(np.int64)
    frames = first_frame + np.arange(n)
    img[(frames >= 150) & (frames < 155)] += 150
    return np.clip(img, 0, top).astype(product.dtype)


def bad_pixels(spec: StreamSpec, seed: int = 0
               ) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """(hot, dead) pixels the ``bad_pixels`` fault plants in a stream: (y, x) of the
    module image, or (quabo, y, x) of ph256's per-quabo images; never the star."""
    product = pff.PRODUCTS[spec.dp]
    h, w = product.shape
    groups = pff.N_QUABOS if product.header_kind == "ph256" else 1
    yy, xx = np.mgrid[:h, :w]
    star = (yy == h // 3) & (xx == w // 3) if spec.dp.startswith("ph") else (
        (yy - 9) ** 2 + (xx - 21) ** 2 <= 9)
    allowed = np.flatnonzero(np.tile(~star.ravel(), groups))
    rng = np.random.default_rng([seed, spec.module, sorted(pff.PRODUCTS).index(spec.dp), 9])
    picked = rng.choice(allowed, HOT_PIXELS + DEAD_PIXELS, replace=False)
    g, y, x = (a.tolist() for a in np.unravel_index(picked, (groups, h, w)))
    where = list(zip(g, y, x, strict=True)) if groups > 1 else list(zip(y, x, strict=True))
    return where[:HOT_PIXELS], where[HOT_PIXELS:]


def _plant_bad_pixels(spec: StreamSpec, images: np.ndarray, headers: dict[str, np.ndarray],
                      seed: int, file_no: int) -> None:
    hot, dead = bad_pixels(spec, seed)
    rng = np.random.default_rng([seed, spec.module, file_no, 10])
    limits = np.iinfo(images.dtype)
    top = 250 if spec.dp == "img8" else limits.max  # as synth_images clips
    ph256 = "quabo_num" in headers
    for place in hot + dead:
        frames = headers["quabo_num"] == place[0] if ph256 else slice(None)
        y, x = place[-2:]
        if place in dead:
            images[frames, y, x] = 0
            continue
        column = images[frames, y, x].astype(np.int64)
        images[frames, y, x] = np.clip(column + rng.poisson(HOT_EXCESS, column.shape),
                                        limits.min, top)


def _apply_faults(rng: np.random.Generator, spec: StreamSpec, images: np.ndarray,
                  headers: dict[str, np.ndarray], file_no: int, seed: int) -> None:
    if "bad_pixels" in spec.faults:
        _plant_bad_pixels(spec, images, headers, seed, file_no)
    n = len(images)
    pick = np.sort(rng.choice(np.arange(1, n - 1), size=min(3, max(n - 2, 0)), replace=False))
    if "long_nsec" in spec.faults and pick.size:
        headers["pkt_nsec"][pick[0]] = 1_000_000_000 + headers["pkt_nsec"][pick[0]] % 1000
    if "clamped_nsec" in spec.faults and pick.size > 1:
        headers["pkt_nsec"][pick[1]] = pff.NSEC_CLAMPED
    if "missing_quabo" in spec.faults and pick.size > 2 and spec.dp != "ph256":
        for f in pff.MODULE_FIELDS:
            headers[f][pick[2], 0] = 0
        images[pick[2], :16, :16] = 0  # quabo 0 is the upper-left quadrant
    if "out_of_order" in spec.faults and file_no == 0 and n > 10:
        headers["tv_sec"][5] -= 2
        headers["pkt_tai"][5] = (headers["pkt_tai"][5] - 2) % 1024


def file_name(spec: StreamSpec, start: dt.datetime, seqno: int) -> str:
    """The DAQ's name of a stream file opened at ``start`` (PFF_FORMAT.md §6)."""
    return (f"start_{start:%Y-%m-%dT%H:%M:%S}Z.dp_{spec.dp}.bpp_{pff.PRODUCTS[spec.dp].bpp}"
            f".module_{spec.module}.seqno_{seqno}.pff")


def opened_at(first_frame_ns: int) -> dt.datetime:
    """The ``start_`` the DAQ gives a rolled-over file: the time it opened it, which is
    when its first frame arrived, to the second."""
    return dt.datetime.fromtimestamp(first_frame_ns // 1_000_000_000, tz=dt.timezone.utc)


def write_stream(directory: Path, spec: StreamSpec, *, seed: int = 0,
                 start: dt.datetime = DEFAULT_START) -> list[Path]:
    """Write the seqno files of one stream; return their paths in seqno order.

    Named as the DAQ names them: seqno 0 with the run's ``start``, every rolled-over
    file with the time it was opened -- its first frame's, rounded down to the second
    (``new_dp_file()`` sets ``start_time = time(NULL)``).
    """
    rng = np.random.default_rng([seed, spec.module, sorted(pff.PRODUCTS).index(spec.dp)])
    t0 = int(start.timestamp()) * 1_000_000_000 + 123_456_789
    paths = []
    for seqno in range(spec.files):
        n = spec.frames_per_file
        first = seqno * n
        times = _true_times(rng, spec, t0, n)
        t0 = int(times[-1]) + spec.cadence_ns
        headers = synth_headers(rng, spec, times, first_pkt=first)
        images = synth_images(rng, spec, n, first)
        _apply_faults(rng, spec, images, headers, seqno, seed)
        opened = start if seqno == 0 else opened_at(int(times[0]))
        path = directory / file_name(spec, opened, seqno)
        with open(path, "wb") as f:
            pff.write_frames(f, spec.dp, images, headers)
            if "partial_last" in spec.faults and seqno == spec.files - 1:
                tail = pff.encode_frames(spec.dp, images[:1], {k: v[:1] for k, v in
                                                               headers.items()})
                f.write(tail[: len(tail) // 2])
        paths.append(path)
    return paths


DAQ_NODE_IP = "192.168.1.100"  # the DAQ node of PANOSETI's example run: hp_stdout_<its IP>
HK_PERIOD_S = 10  # one housekeeping record per source every HK_PERIOD_S seconds
_DOME = {"name": "astrograph", "obslat": 37.3425, "obslon": -121.63777, "obsalt": 1283}


def module_ip(module: int, quabo: int = 0) -> str:
    """IP address of a quabo; quabo 0's is the module's, as obs_config.json gives it.

    The DAQ derives the module number from bits 2..9 of the address (PANOSETI control's
    ``ip_addr_to_module_id``): module 254 is 192.168.3.248, module 1 is 192.168.0.4, and
    quabo q answers at the module's address + q. Its last two bytes, 4 * module + q, are
    the quabo's BOARDLOC in hk.pff.
    """
    if not 0 <= module <= 255:
        raise ValueError(f"module {module}: DAQ module numbers are 0-255 (bits 2..9 of the "
                         "module's IP address)")
    boardloc = 4 * module + quabo
    return f"192.168.{boardloc // 256}.{boardloc % 256}"


def quabo_uids(seed: int, module: int) -> list[str]:
    """The four quabo board UIDs of a module (hex, as quabo_uids.json writes them)."""
    rng = np.random.default_rng([seed, module, 5])
    return [f"{int(u):015x}" for u in rng.integers(1 << 56, 1 << 60, 4)]


def write_run_metadata(run: Path, *, modules: Sequence[int], products: Sequence[str],
                       start: dt.datetime, end: dt.datetime, timing: str = "wr",
                       site: str = "Lick", seed: int = 0) -> list[Path]:
    """What the DAQ writes into a run directory besides data: configs, log, sentinels.

    Names and structure as in PANOSETI's example run (panoseti/pypff ``example/``) and its
    control software: the head node copies obs/daq/data_config.json, quabo_uids.json,
    quabo_ph_baseline.json, sw_info.json and one quabo_config_<quabo IP>.json per quabo into
    the run; hashpipe's output is hp_stdout_<DAQ node IP>; the sentinels recording_ended,
    collect_complete and run_complete hold the time the run ended (the head node's clock,
    here UTC; no zone, no newline). Small, and valid for pypff's config models. Returns the
    paths written.
    """
    paths = []

    def put_json(name: str, value: object, indent: int = 4) -> None:
        paths.append(run / name)
        (run / name).write_text(json.dumps(value, indent=indent) + "\n")

    put_json("obs_config.json", {
        "name": site, "comment": "synthetic observation (panoseti_pipeline)",
        "wps": {"url": "http://admin:1234@192.168.0.100", "quabo_socket": 1},
        "wr_ip_addr": "wrs", "gps_port": "/dev/ttyUSB0",
        "domes": [{**_DOME, "modules": [
            {"mobo_serialno": f"M{10 + i}", "quabo_version": "qfp", "ip_addr": module_ip(m),
             "wps": "wps", "timing_mode": timing, "azimuth": 187.01, "elevation": 62.912,
             "position_angle": -89.105} for i, m in enumerate(modules)]}]})
    put_json("daq_config.json", {
        "head_node_data_dir": "/data/panoseti_data", "head_node_ip_addr": DAQ_NODE_IP,
        "daq_nodes": [{"username": "panosetigraph", "data_dir": "/data/panoseti_data",
                       "ip_addr": DAQ_NODE_IP, "module_ids": "0-255", "bindhost": "enp3s0"}]})
    data_config: dict[str, object] = {"run_type": "sci-obs", "gain": 60}
    if any(dp.startswith("ph") for dp in products):
        data_config["pulse_height"] = {"pe_threshold": 12.5, "two_pixel_trigger": 0,
                                       "three_pixel_trigger": 0}
    if any(dp.startswith("img") for dp in products):
        data_config["image"] = {"integration_time_usec": 1000, "pe_threshold": 2,
                                "quabo_sample_size": 16 if "img16" in products else 8}
    put_json("data_config.json", {**data_config, "max_file_size_mb": 4000})
    for m in modules:
        for q in range(pff.N_QUABOS):
            put_json(f"quabo_config_{module_ip(m, q)}.json", {
                **{f"CHANMASK_{i}": "0xffffffff" for i in range(8)}, "CHANMASK_8": "0x155",
                "GOEMASK": "0x3", "DAC1": "200,200,200,200", "DAC2": "245,245,245,245",
                "GAIN0": "66,66,66,66"}, indent=2)
    put_json("quabo_uids.json", {"domes": [{"modules": [
        {"ip_addr": module_ip(m), "quabos": [{"uid": u} for u in quabo_uids(seed, m)]}
        for m in modules]}]})
    rng = np.random.default_rng([seed, 6])
    put_json("quabo_ph_baseline.json", {
        "date": f"{start - dt.timedelta(days=1):%Y-%m-%dT%H:%M:%S}.125137",
        "quabos": [{"uid": u, "coefs": rng.integers(650, 790, 256).tolist()}
                   for m in modules for u in quabo_uids(seed, m)]})
    put_json("sw_info.json", {"commit": hashlib.sha1(b"synthetic").hexdigest(),
                              "author": "panoseti_pipeline", "branch": "master",
                              "commit_date": f"{start - dt.timedelta(days=30):%Y-%m-%d %H:%M:%S}"})
    paths.append(_write_hashpipe_log(run, modules, products, start))
    for name in SENTINELS:
        (run / name).write_text(f"{end:%Y-%m-%dT%H:%M:%S}")
        paths.append(run / name)
    return paths


def _write_hashpipe_log(run: Path, modules: Sequence[int], products: Sequence[str],
                        start: dt.datetime) -> Path:
    """hp_stdout_<DAQ node IP>: hashpipe's console output, as the DAQ node keeps it."""
    lines = ["initing  thread 'net_thread' with databufs 0 and 1",
             "initing  thread 'compute_thread' with databufs 1 and 2",
             "initing  thread 'output_thread' with databufs 2 and 3", "",
             "-----------Start Setup of Output Thread--------------",
             f"Run directory: {run.name}", "Config Location: ./module.config",
             "Max file size is 4000 megabytes", "",
             "---------------SETTING UP DATA File------------------"]
    for m in modules:
        lines += [f"Created file module_{m}/{run.name}//"
                  f"{file_name(StreamSpec(dp=dp, module=m), start, 0)}" for dp in pff.PRODUCTS]
        lines.append(f"Created Data file for Module {m}")
    lines += ["-----------Finished Setup of Output Thread-----------", "",
              "NET_THREAD Ended", "COMPUTE_THREAD Ended", "OUTPUT_THREAD Ended",
              "Joined thread 'output_thread'", "Joined thread 'compute_thread'",
              "Joined thread 'net_thread'", ""]
    path = run / f"hp_stdout_{DAQ_NODE_IP}"
    path.write_text("\n".join(lines))
    return path


def _quabo_hk(rng: np.random.Generator, boardloc: int, uid: str) -> dict[str, str]:
    """A QUABO_<BOARDLOC> record's fields, formatted as PANOSETI's capture_hk.py does."""
    def g(mean: float, sd: float) -> str:
        return f"{rng.normal(mean, sd):0.5g}"

    return {"BOARDLOC": str(boardloc), **{f"HVMON{i}": g(-55.6, 0.1) for i in range(4)},
            **{f"HVIMON{i}": g(1.1e-4, 2e-6) for i in range(4)}, "RAWHVMON": g(72.57, 0.05),
            "V12MON": g(1.18, 0.003), "V18MON": g(1.78, 0.003), "V33MON": g(3.28, 0.005),
            "V37MON": g(3.71, 0.005), "I10MON": g(1.46, 0.01), "I18MON": g(0.364, 0.003),
            "I33MON": g(0.131, 0.002), "TEMP1": str(round(rng.normal(40, 0.5) * 16) / 16),
            "TEMP2": g(64.1, 0.3), "VCCINT": g(0.988, 0.001), "VCCAUX": g(1.785, 0.001),
            "UID": "0x" + uid.zfill(16), "SHUTTER_STATUS": "0", "LIGHT_SENSOR_STATUS": "0",
            "PCBREV_N": "0", "FWTIME": "0x28b4667a", "FWVER": "0208", "StartUp": "0",
            "STATUS_MSG": "", "AGG_STATUS_MSG": "ok,", "AGG_STATUS_LEVEL": "0",
            **{f"DETR{i}_CURR": g(-1.3e-6, 4e-7) for i in range(4)}}


def _gps_hk(unix_s: float) -> tuple[dict[str, str], dict[str, str]]:
    """GPSPRIM and GPSSUPP fields of a disciplined receiver at Lick at ``unix_s``."""
    gps_s = int(unix_s) - 315_964_800 + 18  # GPS epoch 1980-01-06, 18 leap seconds
    week, tow = divmod(gps_s, 604_800)
    when = f"{dt.datetime.fromtimestamp(int(unix_s), dt.timezone.utc):%Y-%m-%dT%H:%M:%SZ}"
    prim = {"GPSTIME": when, "TOW": str(tow), "WEEKNUMBER": str(week), "UTCOFFSET": "18",
            "TIMEFLAG": "UTC", "PPSFLAG": "UTC", "TIMESET": "1", "UTCINFO": "1",
            "TIMEFROMGPS": "1"}
    alarms = ("DACatRail", "DACnearRail", "AntennaOpen", "AntennaShorted",
              "NotTrackingSatellites", "NotDiscipliningOscillator", "SurveyInProgress",
              "NoStoredPosition", "LeapSecondPending", "InTestMode", "PositionIsQuestionable",
              "EEPROMCorrupt", "AlmanacNotComplete", "PPSNotGenerated")
    supp = {"GPSTIME": when, "RECEIVERMODE": "Overdetermined Clock",
            "DISCIPLININGMODE": "Normal", "SELFSURVEYPROGRESS": "100", "HOLDOVERDURATION": "0",
            **dict.fromkeys(alarms, "0"), "GPSDECODINGSTATUS": "Doing fixes",
            "DISCIPLININGACTIVITY": "Phase locking", "SPARESTATUS1": "0", "SPARESTATUS2": "0",
            "PPSOFFSET": "-0.41", "CLOCKOFFSET": "1.27", "DACVALUE": "524301",
            "DACVOLTAGE": "2.50006", "TEMPERATURE": "48.36", "LATITUDE": str(_DOME["obslat"]),
            "LONGITUDE": str(_DOME["obslon"]), "ALTITUDE": str(_DOME["obsalt"]),
            "PPSQUANTIZATIONERROR": "1.59"}
    return prim, supp


def write_housekeeping(directory: Path, records: int | None = None, *,
                       modules: Sequence[int] = (1,), start: dt.datetime = DEFAULT_START,
                       seed: int = 0) -> Path:
    """hk.pff as PANOSETI's housekeeping recorder writes it (PFF_FORMAT.md §8).

    One single-line JSON record per source and period: ``{"<source>": {fields}}`` with
    every value a string and ``Computer_UTC`` in each; sources QUABO_<BOARDLOC> of every
    quabo, GPSPRIM, GPSSUPP, WRSWITCH (its ``Port 1_LINK`` quirk) and WPS, in that order.
    Records end with a blank line, and the last one is cut half-way (the recorder is
    killed). ``records`` defaults to one period of every source plus the cut one.
    """
    rng = np.random.default_rng([seed, 8])
    boards = [(4 * m + q, uid) for m in modules for q, uid in enumerate(quabo_uids(seed, m))]
    links = {f"Port{p:2d}_LINK": str(int(p <= len(modules))) for p in range(1, 19)}
    records = len(boards) + 5 if records is None else records
    texts: list[str] = []
    period = 0
    while len(texts) < records:
        t0 = start.timestamp() + HK_PERIOD_S * period
        prim, supp = _gps_hk(t0)
        sources = [*((f"QUABO_{b}", _quabo_hk(rng, b, uid)) for b, uid in boards),
                   ("GPSPRIM", prim), ("GPSSUPP", supp), ("WRSWITCH", {**links, "SOFTPLL": "1"}),
                   ("WPS", {"POWER": "ON"})]
        for k, (source, fields) in enumerate(sources[: records - len(texts)]):
            t = t0 + 0.02 * k + rng.uniform(0, 0.01)
            texts.append(json.dumps({source: {"Computer_UTC": f"{t:.7f}", **fields}}))
        period += 1
    last = texts.pop() if texts else ""
    path = directory / pff.HOUSEKEEPING_NAME
    path.write_text("".join(f"{text}\n\n" for text in texts) + last[: len(last) // 2])
    return path


def make_observation(root: str | Path, *, seed: int = 0, modules: Sequence[int] = (1,),
                     products: Sequence[str] = ("img16", "ph256"), frames_per_file: int = 2000,
                     files_per_stream: int = 2, timing: str = "wr",
                     faults: Sequence[str] = (), site: str = "Lick",
                     start: dt.datetime = DEFAULT_START) -> Path:
    """Write ``obs_<site>.start_<t>Z.runtype_sci-obs.pffd`` under ``root``; return it.

    Data files of every stream, 0-byte files of the products not asked for, and what the
    DAQ writes besides data (:func:`write_run_metadata`, :func:`write_housekeeping`).
    """
    unknown = set(faults) - set(FAULTS)
    if unknown:
        raise ValueError(f"unknown faults {sorted(unknown)}; known: {', '.join(FAULTS)}")
    run = Path(root) / f"obs_{site}.start_{start:%Y-%m-%dT%H:%M:%S}Z.runtype_sci-obs.pffd"
    run.mkdir(parents=True, exist_ok=True)
    longest_ns = 0
    for module in modules:
        for dp in pff.PRODUCTS:
            spec = StreamSpec(dp=dp, module=module, frames_per_file=frames_per_file,
                              files=files_per_stream, timing=timing,
                              cadence_ns=1_000_000 if dp.startswith("img") else 5_000_000,
                              faults=frozenset(faults))
            if dp in products:
                write_stream(run, spec, seed=seed, start=start)
                longest_ns = max(longest_ns, spec.files * spec.frames_per_file * spec.cadence_ns)
            else:  # the DAQ creates every product's file at start
                (run / file_name(spec, start, 0)).touch()
    end = start + dt.timedelta(seconds=longest_ns // 1_000_000_000 + 2)
    write_run_metadata(run, modules=modules, products=products, start=start, end=end,
                       timing=timing, site=site, seed=seed)
    write_housekeeping(run, modules=modules, start=start, seed=seed)
    return run


def write_big_file(directory: str | Path, megabytes: int, *, dp: str = "img16", seed: int = 0,
                   block_frames: int = 16384) -> Path:
    """One large clean stream file (benchmarks), written block by block in bounded memory."""
    return write_big_stream(directory, megabytes, 1, dp=dp, seed=seed,
                            block_frames=block_frames)[0]


def write_big_stream(directory: str | Path, megabytes: int, files: int, *, dp: str = "img16",
                     module: int = 1, seed: int = 0, block_frames: int = 16384) -> list[Path]:
    """``files`` seqno files of ``megabytes`` MB each of one clean stream (benchmarks),
    named as the DAQ names its rolled-over files, written in bounded memory."""
    spec = StreamSpec(dp=dp, module=module)
    product = pff.PRODUCTS[dp]
    per_file = megabytes * 1_000_000 // product.frame_bytes
    rng = np.random.default_rng(seed)
    t0 = int(DEFAULT_START.timestamp()) * 1_000_000_000
    paths = []
    for seqno in range(files):
        first_of_file = seqno * per_file
        opened = DEFAULT_START if seqno == 0 else opened_at(
            t0 + first_of_file * spec.cadence_ns)
        path = Path(directory) / file_name(spec, opened, seqno)
        with open(path, "wb") as f:
            for first in range(first_of_file, first_of_file + per_file, block_frames):
                n = min(block_frames, first_of_file + per_file - first)
                times = t0 + (first + np.arange(n, dtype=np.int64)) * spec.cadence_ns
                pff.write_frames(f, dp, synth_images(rng, spec, n, first),
                                 synth_headers(rng, spec, times, first_pkt=first))
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None,
         prog: str = "python3 -m panoseti_pipeline synthetic") -> int:
    """Write a synthetic PANOSETI observation (or one big file) for tests and demos."""
    from panoseti_pipeline.errors import run_main
    from panoseti_pipeline.version import add_version_option

    parser = argparse.ArgumentParser(prog=prog, description=main.__doc__)
    add_version_option(parser)
    parser.add_argument("root", help="directory to write into (created if needed)")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed: the same seed writes the same bytes (default 0)")
    parser.add_argument("--modules", type=int, nargs="+", default=[1],
                        help="module numbers to record (default: 1)")
    parser.add_argument("--products", nargs="+", default=["img16", "ph256"],
                        choices=sorted(pff.PRODUCTS),
                        help="data products, one stream each per module (default: img16 ph256)")
    parser.add_argument("--frames", type=int, default=2000, help="frames per file")
    parser.add_argument("--files-per-stream", type=int, default=2,
                        help="seqno files per stream (default 2)")
    parser.add_argument("--timing", choices=("wr", "gnss"), default="wr",
                        help="wr: White Rabbit timing (default); gnss: host clock only")
    parser.add_argument("--faults", default="",
                        help=f"comma-separated subset of {', '.join(FAULTS)}; or all")
    parser.add_argument("--single-file-mb", type=int, default=0,
                        help="instead: write one clean img16 file of this many MB")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    faults = FAULTS if args.faults == "all" else [f for f in args.faults.split(",") if f]

    def body() -> int:
        Path(args.root).mkdir(parents=True, exist_ok=True)
        if args.single_file_mb:
            print(write_big_file(args.root, args.single_file_mb, seed=args.seed))
            return 0
        print(make_observation(args.root, seed=args.seed, modules=args.modules,
                               products=args.products, frames_per_file=args.frames,
                               files_per_stream=args.files_per_stream, timing=args.timing,
                               faults=faults))
        return 0

    return run_main(body, "synthetic", args.debug)


if __name__ == "__main__":
    sys.exit(main())
