"""The pipeline's configuration: schema, validation on load, frozen typed sections.

A TOML file (``config.toml``) has four sections, each validated once, on load, into a
frozen dataclass: ``[cluster]`` → :class:`ClusterConfig`, ``[pff_to_zarr]`` →
:class:`PffToZarrConfig`, ``[baseline_subtract]`` → :class:`BaselineConfig`, ``[run]`` →
:class:`RunConfig`; :class:`PipelineConfig` holds them plus ``source`` (the file). A
config written for the original PANOSETI pipeline (only its keys) loads unchanged.

The schema is declarative: each dataclass field is one line giving the key's type (the
annotation), default, range or choices, and documentation (:func:`key`). Adding a key is
adding that line (and its commented line in ``config.toml``).

Every problem in a file is collected and reported at once, one line each, naming the file,
the section and the key, in one :class:`pipeline_errors.ConfigError`::

    config.toml: [pff_to_zarr] unknown key 'codex' (did you mean 'codec'?)
    config.toml: [pff_to_zarr] level = 10 is out of range (1..9)
    config.toml: [baseline_subtract] baseline_window must be an integer, got "200"

Usage::

    python3 pipeline_config.py check config.toml  # "config ok: config.toml", or problems (exit 2)
    python3 pipeline_config.py show config.toml   # the effective configuration as TOML

    >>> cfg = load_config("config.toml")
    >>> cfg.baseline_subtract.baseline_window
    200
    >>> cfg = cfg.with_overrides("baseline_subtract", baseline_window=500)

Notes
-----
* TOML ``true`` is not an integer here (Python's ``bool`` is an ``int`` subclass; it is
  refused wherever an integer or a number is expected). Integers are accepted where a
  float is expected and stored as float.
* Lists are stored as tuples so the sections stay immutable and hashable;
  :meth:`PipelineConfig.as_dict` gives them back as lists.
* Sections constructed directly (``ClusterConfig(...)``, ``dataclasses.replace``) are
  validated too, in ``__post_init__``.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import json
import math
import os
import re
import sys
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from panoseti_pipeline.errors import ConfigError, run_main

DEFAULTS_SOURCE = "<defaults>"

CODECS = ("blosc-lz4", "zstd", "gzip", "none")
SHUFFLES = ("bit", "byte", "none")
BASELINE_METHODS = ("clipped_mean", "mean", "median", "image_median", "ph_pedestal",
                    "panoseti_analysis")
L1_LAYOUTS = ("pipeline", "panoseti_analysis")
BLOCK_SIZES = (1, 2, 4, 8, 16, 32)  # divisors of a module image's side
CLUSTER_TYPES = ("local", "ssh", "slurm", "scheduler")
#: A SLURM time limit: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS.
SLURM_TIME = r"\d+(:\d+){0,2}|\d+-\d+(:\d+){0,2}"


# --------------------------------------------------------------------------- messages


def _show(value: Any) -> str:
    """A value as it would be written in TOML."""
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, (str, bool, int, float)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)  # TOML dates and times


def _did_you_mean(word: Any, candidates: Any, quote: bool = False, brackets: bool = False) -> str:
    close = difflib.get_close_matches(str(word), list(candidates), n=1, cutoff=0.6)
    if not close:
        return ""
    shown = f"[{close[0]}]" if brackets else (_show(close[0]) if quote else repr(close[0]))
    return f" (did you mean {shown}?)"


def _unknown_key_hint(cls: type[_Section], name: str) -> str:
    hint = _did_you_mean(name, cls._fields)
    if hint:
        return hint
    homes = [f"[{s}]" for s, other in _SECTIONS.items() if name in other._fields]
    if homes:
        return f" (it belongs in {' or '.join(homes)})"
    return f" (valid keys: {', '.join(cls._fields)})"


def _unknown_section(name: str) -> str:
    hint = _did_you_mean(name, _SECTIONS, brackets=True)
    return f"unknown section [{name}]" + (
        hint or f" (valid sections: {', '.join(f'[{s}]' for s in _SECTIONS)})"
    )


def _stray_key(name: str, value: Any) -> str:
    homes = [f"[{s}]" for s, cls in _SECTIONS.items() if name in cls._fields]
    where = f"put it under {' or '.join(homes)}" if homes else "every key belongs under a [section]"
    return f"key {name} = {_show(value)} is outside any section ({where})"


#: the plain forms of a size (e.g. "4GB", "512 MiB"), all of which dask reads as written
_PLAIN_SIZE = re.compile(r" *(\d+(?:\.\d+)?) *((?:[kmgtp]i?)?b)? *", re.IGNORECASE)
_UNITS = {"": 1, "b": 1} | {f"{p}{i}b": (1024 if i else 1000) ** (k + 1)
                            for k, p in enumerate("kmgtp") for i in ("", "i")}


@functools.lru_cache(maxsize=64)
def _is_memory_size(text: str) -> bool:
    """Whether dask reads ``text`` as a positive size (``dask.utils.parse_bytes``).

    A plain size is judged here: importing dask costs every step 0.13 s, and a local
    run never needs it. Anything else ("1e9", "5k") is left to dask itself.
    """
    plain = _PLAIN_SIZE.fullmatch(text)
    if plain:
        return int(float(plain[1]) * _UNITS[(plain[2] or "").lower()]) > 0
    from dask.utils import parse_bytes

    try:
        return parse_bytes(text) > 0
    except (ValueError, TypeError):
        return False


# --------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class Key:
    """The rules for one configuration key; its type is the dataclass annotation.

    ``lo``/``hi`` are inclusive bounds, ``above`` an exclusive lower bound, ``choices``
    the allowed strings, ``memory`` marks a size string that ``dask.utils.parse_bytes``
    must accept, ``pattern`` a regular expression the whole string must match and
    ``shape`` what such a string is, for the message. ``speed`` marks a key of a step that
    changes only how fast its product is made, never the product
    (:meth:`_Section.differences`).
    """

    doc: str
    lo: int | float | None = None
    hi: int | float | None = None
    above: int | float | None = None
    choices: tuple[str, ...] = ()
    memory: bool = False
    pattern: str = ""
    shape: str = ""
    speed: bool = False

    def field(self, default: Any) -> Any:
        """A dataclass field with this key's rules and ``default``."""
        return dataclasses.field(default=default, metadata={"key": self})

    def problem(self, name: str, value: Any) -> str | None:
        """Why ``value`` (already of the right type) is not allowed, or None."""
        if self.choices and value not in self.choices:
            allowed = ", ".join(_show(c) for c in self.choices)
            hint = _did_you_mean(value, self.choices, quote=True)
            return f"{name} = {_show(value)} is not one of {allowed}{hint}"
        if self.memory and not _is_memory_size(value):
            return f'{name} = {_show(value)} is not a memory size (e.g. "4GB", "512MiB")'
        if self.pattern and not re.fullmatch(self.pattern, value):
            return f"{name} = {_show(value)} is not {self.shape}"
        too_low = (self.lo is not None and value < self.lo) or (
            self.above is not None and value <= self.above
        )
        if too_low or (self.hi is not None and value > self.hi):
            return f"{name} = {_show(value)} is out of range ({self._range()})"
        return None

    def _range(self) -> str:
        if self.lo is not None and self.hi is not None:
            return f"{self.lo}..{self.hi}"
        if self.above is not None:
            return f"> {self.above}"
        return f">= {self.lo}"


def key(default: Any, doc: str, **rules: Any) -> Any:
    """Declare a configuration key: ``name: type = key(default, doc, lo=, hi=, ...)``."""
    return Key(doc, **rules).field(default)


# Keys shared by [pff_to_zarr] and [baseline_subtract] (defaults may differ).
_CODEC = Key("compressor: blosc-lz4 and zstd are Blosc with that cname; gzip; none", choices=CODECS)
_LEVEL = Key("compression level, 1 (fast) .. 9 (small)", lo=1, hi=9)
_SHUFFLE = Key("Blosc shuffle filter (ignored by gzip/none)", choices=SHUFFLES)
_CHECKSUM = Key("append a zarr Crc32cCodec to every chunk")
_SHARDS = Key("chunks per shard file (PANOSETI's shard_factor); 0 = one file per chunk", lo=0)


_S = TypeVar("_S", bound="type[_Section]")

_KIND_NAMES: dict[Any, str] = {
    bool: "bool",
    int: "int",
    float: "float",
    str: "str",
    tuple[str, ...]: "list[str]",
}


def _type_problem(name: str, kind: Any, value: Any) -> tuple[Any, str | None]:
    """Normalise ``value`` to ``kind`` or say why it is the wrong type."""
    if kind is bool:
        ok, what = isinstance(value, bool), "true or false"
    elif kind is int:
        ok, what = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        what = "a number"
        if ok:
            value = float(value)
            if not math.isfinite(value):
                return value, f"{name} must be a finite number, got {_show(value)}"
    elif kind is str:
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        ok, what = isinstance(value, str), "a string"
    else:  # tuple[str, ...]
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) and v for v in value)
        what = "a list of non-empty strings"
        if ok:
            value = tuple(value)
    return value, (None if ok else f"{name} must be {what}, got {_show(value)}")


@dataclass(frozen=True)
class _Field:
    name: str
    kind: Any
    default: Any
    rules: Key

    def parse(self, value: Any) -> tuple[Any, str | None]:
        value, problem = _type_problem(self.name, self.kind, value)
        return value, problem or self.rules.problem(self.name, value)


class _Section:
    """Base of the section dataclasses: validation shared by load and construction."""

    section: ClassVar[str]
    _fields: ClassVar[dict[str, _Field]]

    def __post_init__(self) -> None:
        values, problems = _parse_section(type(self), _values(self))
        if problems:
            raise ConfigError("\n".join(problems), problems=problems)
        for name, value in values.items():
            object.__setattr__(self, name, value)

    @classmethod
    def _resolve(cls, values: dict[str, Any]) -> None:
        """Fill derived defaults in the raw ``values`` (before type checks)."""

    @classmethod
    def _cross_problems(cls, values: Mapping[str, Any]) -> list[str]:
        """Problems between keys, given every effective, well-typed value."""
        return []

    def differences(self, recorded: Mapping[str, Any]) -> list[tuple[str, str, str]]:
        """``(key, recorded, this)`` for each key that makes the product (not a ``speed``
        key) whose value in ``recorded`` -- the section as a product's ``config``
        attribute holds it -- differs from this one's; values as TOML writes them,
        ``?`` where the product does not say."""
        out = []
        for name, fld in type(self)._fields.items():
            now = getattr(self, name)
            then = recorded.get(name)
            if fld.rules.speed or then == (list(now) if isinstance(now, tuple) else now):
                continue
            out.append((name, "?" if then is None else _show(then), _show(now)))
        return out


def _values(section: _Section) -> dict[str, Any]:
    """The keys of a section dataclass and their values (a shallow ``asdict``)."""
    return {name: getattr(section, name) for name in type(section)._fields}


def _register(cls: _S) -> _S:
    """Build ``cls._fields`` from the annotations and :func:`key` metadata; document keys."""
    hints = typing.get_type_hints(cls)
    cls._fields = {}
    for f in dataclasses.fields(cls):
        if hints[f.name] not in _KIND_NAMES:
            raise TypeError(f"{cls.__name__}.{f.name}: unsupported config type {hints[f.name]}")
        cls._fields[f.name] = _Field(f.name, hints[f.name], f.default, f.metadata["key"])
    lines = [
        f"    {f.name} : {_KIND_NAMES[f.kind]} = {_show(f.default)}\n        {f.rules.doc}"
        for f in cls._fields.values()
    ]
    cls.__doc__ = f"{cls.__doc__}\n\n    Attributes\n    ----------\n" + "\n".join(lines)
    return cls


def _parse_section(cls: type[_Section], raw: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Check the keys and values of one section; return the normalised values and problems.

    Problems are ``"[section] ..."`` lines; the caller prefixes where they came from.
    """
    where = f"[{cls.section}]"
    raw = dict(raw)
    cls._resolve(raw)
    values: dict[str, Any] = {}
    problems: list[str] = []
    for name, value in raw.items():
        fld = cls._fields.get(name)
        if fld is None:
            problems.append(f"{where} unknown key {name!r}{_unknown_key_hint(cls, name)}")
            continue
        values[name], problem = fld.parse(value)
        if problem:
            problems.append(f"{where} {problem}")
    if not problems:
        effective = {name: fld.default for name, fld in cls._fields.items()} | values
        problems = [f"{where} {p}" for p in cls._cross_problems(effective)]
    return values, problems


# --------------------------------------------------------------------------- sections


@_register
@dataclass(frozen=True)
class ClusterConfig(_Section):
    """[cluster]: where the Dask work runs."""

    section: ClassVar[str] = "cluster"

    use_dask: bool = key(False, "false: steps run in this process, no cluster")
    cluster_type: str = key(
        "",
        'local | ssh | slurm | scheduler; absent or "": ssh if ssh_hosts else local',
        choices=CLUSTER_TYPES,
    )
    scheduler_address: str = key(
        "", 'address of a running scheduler, e.g. "tcp://10.0.0.1:8786" (scheduler)'
    )
    ssh_hosts: tuple[str, ...] = key(
        (), "hosts; the first also runs the scheduler, every one runs workers"
    )
    ssh_workers_per_host: int = key(1, "worker processes per SSH host", lo=1)
    ssh_threads_per_worker: int = key(1, "threads per SSH worker", lo=1)
    ssh_memory_per_worker: str = key(
        "4GB", "memory limit per SSH worker (dask size string)", memory=True
    )
    ssh_username: str = key("", 'SSH user; "" = the current user')
    ssh_port: int = key(22, "SSH port", lo=1, hi=65535)
    ssh_client_keys: tuple[str, ...] = key(
        (), "private key files; empty = asyncssh defaults (~/.ssh/id_*)"
    )
    ssh_known_hosts: str = key("", 'known_hosts file; "" = ~/.ssh/known_hosts')
    ssh_verify_host_keys: bool = key(True, "false accepts unknown host keys (unsafe)")
    remote_python: str = key("", 'interpreter on the SSH hosts; "" = this client\'s sys.executable')
    interface: str = key("", 'network interface to bind ("lo", "ib0", "eth0"); "" = dask default')
    local_workers: int = key(2, "worker processes of a local cluster", lo=1)
    local_threads_per_worker: int = key(1, "threads per local worker", lo=1)
    local_memory_per_worker: str = key(
        "4GB", "memory limit per local worker (dask size string)", memory=True
    )
    # SLURM (dask-jobqueue's SLURMCluster; its own names after "slurm_").
    slurm_jobs: int = key(1, "SLURM jobs submitted, each running slurm_processes workers", lo=1)
    slurm_queue: str = key("", 'partition (#SBATCH -p); "" = the cluster\'s default')
    slurm_account: str = key("", 'account charged (#SBATCH -A); "" = your default')
    slurm_cores: int = key(1, "cores per job (--cpus-per-task), shared by its workers", lo=1)
    slurm_memory: str = key(
        "4GB", "memory per job (#SBATCH --mem), shared by its workers", memory=True
    )
    slurm_processes: int = key(1, "worker processes per job", lo=1)
    slurm_walltime: str = key(
        "00:30:00",
        'time limit per job (#SBATCH -t), e.g. "04:00:00" or "1-00:00:00"',
        pattern=SLURM_TIME,
        shape='a SLURM time limit (e.g. "30", "04:00:00", "1-12:00:00")',
    )
    slurm_job_extra_directives: tuple[str, ...] = key(
        (), 'more #SBATCH options, e.g. ["--qos=normal", "--tmp=100G"]'
    )
    slurm_job_script_prologue: tuple[str, ...] = key(
        (), 'shell lines run before the worker, e.g. ["module load python"]'
    )
    slurm_worker_extra_args: tuple[str, ...] = key(
        (), 'more dask worker options, e.g. ["--lifetime", "3h50m", "--lifetime-stagger", "5m"]'
    )
    slurm_log_directory: str = key(
        "", 'directory of the jobs\' output files; "" = slurm-<id>.out where the cluster started'
    )
    local_directory: str = key(
        "", 'workers\' scratch (spill) directory, node-local; "" = Dask\'s default (temp dir)'
    )
    min_workers: int = key(0, "workers that must join before work starts; 0 = all requested", lo=0)
    startup_timeout_s: float = key(
        120.0, "seconds to wait for the cluster and its workers", above=0
    )
    dashboard_port: int = key(0, "Dask dashboard port; 0 = no dashboard", lo=0, hi=65535)

    @classmethod
    def _resolve(cls, values: dict[str, Any]) -> None:
        if values.get("cluster_type", "") == "":
            values["cluster_type"] = "ssh" if values.get("ssh_hosts") else "local"

    @classmethod
    def _cross_problems(cls, values: Mapping[str, Any]) -> list[str]:
        kind, hosts = values["cluster_type"], values["ssh_hosts"]
        if kind == "scheduler" and not values["scheduler_address"]:
            return [
                'cluster_type = "scheduler" needs scheduler_address (e.g. "tcp://10.0.0.1:8786")'
            ]
        if kind == "ssh" and not hosts:
            return ['cluster_type = "ssh" needs a non-empty ssh_hosts list']
        if kind in ("local", "slurm") and hosts:
            return [
                f'cluster_type = "{kind}" but ssh_hosts is set: set cluster_type = "ssh" '
                "(or remove it) to use the hosts, or empty ssh_hosts"
            ]
        if kind == "slurm" and values["slurm_processes"] > values["slurm_cores"]:
            return [
                f"slurm_processes = {values['slurm_processes']} is more than slurm_cores = "
                f"{values['slurm_cores']}: each worker process needs a core"
            ]
        requested = {
            "ssh": len(hosts) * values["ssh_workers_per_host"],
            "local": values["local_workers"],
            "slurm": values["slurm_jobs"] * values["slurm_processes"],
        }
        if values["min_workers"] > requested.get(kind, math.inf):
            wanted = values["min_workers"]
            return [f"min_workers = {wanted} is more than the {requested[kind]} workers requested"]
        return []

    @property
    def n_workers(self) -> int | None:
        """Workers this config starts (None for an external scheduler)."""
        if self.cluster_type == "ssh":
            return len(self.ssh_hosts) * self.ssh_workers_per_host
        if self.cluster_type == "slurm":
            return self.slurm_jobs * self.slurm_processes
        return self.local_workers if self.cluster_type == "local" else None


@_register
@dataclass(frozen=True)
class PffToZarrConfig(_Section):
    """[pff_to_zarr]: step 1, PFF → L0 Zarr (lossless)."""

    section: ClassVar[str] = "pff_to_zarr"

    codec: str = _CODEC.field("blosc-lz4")
    level: int = _LEVEL.field(5)
    shuffle: str = _SHUFFLE.field("bit")
    checksum: bool = _CHECKSUM.field(True)
    time_chunk: int = key(8192, "frames per Zarr chunk", lo=1)
    num_workers: int = key(2, "parallel tasks in local mode (use_dask = false)", lo=1,
                           speed=True)
    blosc_threads: int = key(2, "compression threads per running task", lo=1, speed=True)
    max_concurrent_writes: int = key(4, "chunk writes in flight per process", lo=1,
                                     speed=True)
    chunk_size_mb: int = key(64, "raw MB per task (shard_factor = 0), in whole time_chunks",
                             lo=1, speed=True)
    shard_factor: int = _SHARDS.field(64)
    strict: bool = key(False, "true: a corrupt frame refuses the file; false: its bytes are "
                              "skipped, recorded and the next frame flagged after_gap")


@_register
@dataclass(frozen=True)
class BaselineConfig(_Section):
    """[baseline_subtract]: step 2, L0 → L1 (baseline-subtracted float32)."""

    section: ClassVar[str] = "baseline_subtract"

    method: str = key(
        "clipped_mean",
        "clipped_mean | mean | median of the first baseline_window frames (clipped_mean: "
        "the mean of the values within 3.5 robust sigmas of the median, so a flash there "
        "does not bias it), image_median, ph_pedestal, panoseti_analysis (the PANOSETI "
        "analysis code's ph or img calibration)",
        choices=BASELINE_METHODS,
    )
    baseline_window: int = key(200, "frames that make the baseline", lo=1)
    codec: str = _CODEC.field("blosc-lz4")
    level: int = _LEVEL.field(5)
    shuffle: str = _SHUFFLE.field("bit")
    checksum: bool = _CHECKSUM.field(True)
    compute_chunk_size: int = key(8192, "frames per output chunk (and task, unsharded)", lo=1)
    shard_factor: int = _SHARDS.field(64)
    frame_step: int = key(10, "image_median: use every frame_step-th frame", lo=1)
    adc_to_pe: float = key(1.5, "image_median, panoseti_analysis (img): ADC counts per "
                                "photoelectron; every method: the gain whose shot noise "
                                "tells a star from a hot pixel", above=0)
    block_size: int = key(8, "image_median, panoseti_analysis (img): side of the spatial "
                             "median blocks (pixels; divides 32)", lo=1, hi=32)
    sigma_threshold: float = key(3.0, "ph_pedestal: pedestal cut in standard deviations", above=0)
    frame_stride: int = key(200, "panoseti_analysis: every frame_stride-th frame in time "
                                 "order feeds the baseline", lo=1)
    baseline_offset: int = key(800, "panoseti_analysis (ph): added to the pulse heights "
                                    "before the pedestal is taken")
    analysis_sigma_threshold: float = key(
        5.0, "panoseti_analysis (ph): values not above this many pedestal standard "
        "deviations become NaN", above=0)
    l1_layout: str = key(
        "pipeline", "pipeline: <output>/<run>/<name>_L1.zarr with images; panoseti_analysis: "
        "PANOSETI's analysis storage spec (level-major directories, their array names and "
        "attributes, manifests)", choices=L1_LAYOUTS)
    fail_on_suspect: bool = key(
        True, "refuse an L0 whose unix_t_ns jumps back by more than 1000 cadences (images) "
        "or 1 s (pulse heights): timestamp corruption")
    keep_mantissa_bits: int = key(
        23, "float32 mantissa bits kept; 23 = exact, fewer = BitRound (lossy)", lo=1, hi=23
    )
    baseline_quantum: float = key(
        0.125, "baseline rounded to a multiple of this (ADC counts; a power of two <= 1) "
        "before subtracting, so L1 + baseline = L0 exactly; 0 = the exact float baseline",
        lo=0, hi=1)

    @classmethod
    def _cross_problems(cls, values: Mapping[str, Any]) -> list[str]:
        problems = []
        quantum = values["baseline_quantum"]
        if quantum and math.frexp(quantum)[0] != 0.5:  # not 2**k
            problems.append(f"baseline_quantum = {_show(quantum)} is not a power of two "
                            "(1, 0.5, 0.25, 0.125, ...) or 0")
        if values["block_size"] not in BLOCK_SIZES:
            problems.append(f"block_size = {_show(values['block_size'])} does not divide "
                            f"32 (one of {', '.join(map(str, BLOCK_SIZES))})")
        return problems


@_register
@dataclass(frozen=True)
class RunConfig(_Section):
    """[run]: the driver (run.sh)."""

    section: ClassVar[str] = "run"

    l0_dir: str = key(
        "", 'where L0 stores are written; "" = <output_l1_dir>/.l0_tmp (--keep-l0: .../L0)'
    )
    group_writable: bool = key(
        False, "create files and directories group-writable (never world-writable)"
    )
    stop_grace_s: float = key(
        60.0, "seconds a step, then the cluster manager, gets after SIGTERM before SIGKILL",
        above=0,
    )
    concurrent_products: int = key(
        0, "products in flight at once (each: step 1, step 2, L0 removal, in order); "
        "0 = one per worker thread of the cluster (use_dask = false: per CPU)", lo=0,
        speed=True,
    )


_SECTIONS: dict[str, type[_Section]] = {
    cls.section: cls for cls in (ClusterConfig, PffToZarrConfig, BaselineConfig, RunConfig)
}


@dataclass(frozen=True)
class PipelineConfig:
    """The whole, validated configuration; ``source`` is the file (or ``"<defaults>"``)."""

    cluster: ClusterConfig = dataclasses.field(default_factory=ClusterConfig)
    pff_to_zarr: PffToZarrConfig = dataclasses.field(default_factory=PffToZarrConfig)
    baseline_subtract: BaselineConfig = dataclasses.field(default_factory=BaselineConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    source: str = DEFAULTS_SOURCE

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """The effective values of every section as a plain, TOML-serialisable dict."""
        return {
            name: {
                k: list(v) if isinstance(v, tuple) else v
                for k, v in _values(getattr(self, name)).items()
            }
            for name in _SECTIONS
        }

    def with_overrides(self, section: str, **values: Any) -> PipelineConfig:
        """A copy with ``values`` replacing keys of ``section``, validated again.

        For command-line options: a value of ``None`` (an option not given) is ignored.
        Raises :class:`ConfigError` naming ``"<source> + override"``.
        """
        origin = f"{self.source} + override"
        if section not in _SECTIONS:
            raise ConfigError(f"{origin}: {_unknown_section(section)}")
        raw = _values(getattr(self, section)) | {k: v for k, v in values.items() if v is not None}
        return dataclasses.replace(
            self, **{section: _build_section(_SECTIONS[section], raw, origin)}
        )


# --------------------------------------------------------------------------- loading


def load_config(path: str | os.PathLike[str] | None) -> PipelineConfig:
    """Read and validate a TOML config file; ``None`` gives all defaults.

    Raises :class:`ConfigError` listing every problem, one line each, naming the file.
    """
    if path is None:
        return PipelineConfig()
    source = os.fspath(path)
    try:
        with open(source, "rb") as f:
            document = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{source}: config file not found") from None
    except OSError as err:
        raise ConfigError(f"{source}: cannot read config file: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{source}: not UTF-8 text (byte {err.start})") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{source}: {_syntax_error(err)}") from None
    return from_dict(document, source)


def from_dict(document: Mapping[str, Any], source: str = DEFAULTS_SOURCE) -> PipelineConfig:
    """Validate an already-parsed TOML document (``{section: {key: value}}``)."""
    problems = []
    for name, table in document.items():
        if name not in _SECTIONS:
            problems.append(
                _unknown_section(name) if isinstance(table, dict) else _stray_key(name, table)
            )
        elif not isinstance(table, dict):
            problems.append(f"[{name}] must be a table (a [{name}] section), got {_show(table)}")
    sections = {}
    for name, cls in _SECTIONS.items():
        table = document.get(name, {})
        values, found = _parse_section(cls, table if isinstance(table, dict) else {})
        problems += found
        if not found:
            sections[name] = cls(**values)
    _raise_if(problems, source)
    return PipelineConfig(**sections, source=source)


def _build_section(cls: type[_Section], raw: Mapping[str, Any], origin: str) -> Any:
    values, problems = _parse_section(cls, raw)
    _raise_if(problems, origin)
    return cls(**values)


def _raise_if(problems: list[str], origin: str) -> None:
    lines = [f"{origin}: {p}" for p in problems]
    if len(lines) > 1:
        lines.insert(0, f"{len(lines)} problems in {origin}:")
    if lines:
        raise ConfigError("\n".join(lines), problems=lines[-len(problems):])


def _syntax_error(err: tomllib.TOMLDecodeError) -> str:
    """``line 3: invalid TOML: <what> (column 5)`` from tomllib's message."""
    message = str(err)
    lineno = getattr(err, "lineno", None)  # Python >= 3.14
    head, sep, tail = message.rpartition(" (at line ")
    if sep and lineno is None:
        lineno, _, col = tail.rstrip(")").partition(", column ")
        return f"line {lineno}: invalid TOML: {head} (column {col})"
    if lineno is not None:
        return f"line {lineno}: invalid TOML: {getattr(err, 'msg', message)} (column {err.colno})"
    return f"invalid TOML: {message}"


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None, prog: str = "python3 -m panoseti_pipeline config") -> int:
    """``check CONFIG`` or ``show CONFIG``; see the module docstring."""
    from panoseti_pipeline.version import add_version_option

    parser = argparse.ArgumentParser(prog=prog, description="Check or show a pipeline config.")
    add_version_option(parser)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("config", metavar="CONFIG", help="TOML configuration file")
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "check", parents=[common], help="validate; print 'config ok: CONFIG' or the problems"
    )
    commands.add_parser("show", parents=[common], help="print the effective configuration as TOML")
    args = parser.parse_args(argv)

    def body() -> int:
        config = load_config(args.config)
        if args.command == "check":
            print(f"config ok: {config.source}")
        else:
            import tomli_w

            print(f"# effective configuration of {config.source}")
            print(tomli_w.dumps(config.as_dict()), end="")
        return 0

    return run_main(body, "panoseti_pipeline config", args.debug)


if __name__ == "__main__":
    sys.exit(main())
