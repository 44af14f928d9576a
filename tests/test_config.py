"""Tests of pipeline_config: shipped config.toml, original-pipeline configs, every error class."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest
import tomli_w

from panoseti_pipeline import config as pc
from panoseti_pipeline.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "config.toml"

ORIGINAL = """\
[cluster]
use_dask = true
ssh_hosts = ["10.0.1.1", "10.0.1.2", "10.0.1.3", "10.0.1.4"]
ssh_workers_per_host = 2
ssh_threads_per_worker = 4
ssh_memory_per_worker = "16GB"
[pff_to_zarr]
codec = "blosc-lz4"
level = 5
time_chunk = 65536
num_workers = 8
blosc_threads = 4
max_concurrent_writes = 16
chunk_size_mb = 256
[baseline_subtract]
baseline_window = 200
codec = "blosc-lz4"
level = 5
compute_chunk_size = 8192
"""


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems(tmp_path: Path, text: str) -> list[str]:
    """The problem lines of loading ``text`` (without the 'N problems' summary line)."""
    with pytest.raises(ConfigError) as info:
        pc.load_config(write(tmp_path, text))
    lines = str(info.value).splitlines()
    return lines[1:] if len(lines) > 1 else lines


def one_problem(tmp_path: Path, text: str) -> str:
    found = problems(tmp_path, text)
    assert len(found) == 1, found
    assert found[0].startswith(f"{tmp_path / 'config.toml'}: "), found[0]
    return found[0].split(": ", 1)[1]


# --------------------------------------------------------------------------- good configs


def test_defaults():
    cfg = pc.load_config(None)
    assert cfg.source == "<defaults>"
    assert cfg.cluster.cluster_type == "local"
    assert cfg.baseline_subtract.baseline_window == 200
    assert cfg.pff_to_zarr.shuffle == "bit" and cfg.baseline_subtract.shuffle == "bit"
    assert cfg == pc.PipelineConfig()


def test_shipped_config_is_the_defaults():
    cfg = pc.load_config(SHIPPED)
    assert cfg.source == str(SHIPPED)
    # A config that leaves a key out gets the shipped value: no hidden default.
    assert dataclasses.replace(cfg, source="<defaults>") == pc.load_config(None)
    assert cfg.baseline_subtract.method == "clipped_mean"
    assert not cfg.cluster.use_dask
    assert cfg.cluster.cluster_type == "local"
    assert (
        cfg.cluster.local_workers,
        cfg.cluster.local_threads_per_worker,
        cfg.cluster.interface,
    ) == (2, 1, "")


def test_shipped_config_lists_every_key_with_a_comment():
    document = tomllib.loads(SHIPPED.read_text())
    assert {name: set(table) for name, table in document.items()} == {
        name: set(table) for name, table in pc.load_config(None).as_dict().items()
    }
    lines = SHIPPED.read_text().splitlines()
    for i, line in enumerate(lines):
        if line and not line.startswith(("#", "[")):
            assert lines[i - 1].startswith("#"), f"config.toml line {i + 1} has no comment: {line}"


def test_shipped_ssh_block_is_one_edit():
    lines = SHIPPED.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# --- For an SSH cluster"))
    end = next(i for i, line in enumerate(lines) if line.startswith("# --- end of the SSH block"))
    block = [line.removeprefix("# ") for line in lines[start + 1 : end]]
    keys = [line.split(" = ")[0] for line in block]
    kept = [
        line for line in lines if line.split(" = ")[0] not in keys
    ]  # drop the lines the block replaces
    edited = kept[:start] + block + kept[start:]
    cfg = pc.from_dict(tomllib.loads("\n".join(edited)))
    assert cfg.cluster.cluster_type == "ssh"
    assert len(cfg.cluster.ssh_hosts) == 4 and cfg.cluster.interface == "ib0"
    assert cfg.cluster.ssh_known_hosts and cfg.cluster.remote_python


def test_original_pipeline_config_loads_unchanged(tmp_path):
    cfg = pc.load_config(write(tmp_path, ORIGINAL))
    assert cfg.cluster.cluster_type == "ssh"
    assert cfg.cluster.ssh_hosts == ("10.0.1.1", "10.0.1.2", "10.0.1.3", "10.0.1.4")
    assert cfg.cluster.n_workers == 8
    assert cfg.cluster.ssh_memory_per_worker == "16GB"
    assert cfg.pff_to_zarr.time_chunk == 65536 and cfg.pff_to_zarr.max_concurrent_writes == 16
    # it names no method: the shipped default (robust to a flash in the window)
    assert cfg.baseline_subtract.baseline_window == 200
    assert cfg.baseline_subtract.method == "clipped_mean"


@pytest.mark.parametrize("text", [ORIGINAL, SHIPPED.read_text(), ""])
def test_round_trip_through_toml(tmp_path, text):
    cfg = pc.load_config(write(tmp_path, text))
    again = pc.load_config(write(tmp_path, tomli_w.dumps(cfg.as_dict()), "again.toml"))
    assert dataclasses.replace(again, source=cfg.source) == cfg


def test_sections_are_frozen_and_typed(tmp_path):
    cfg = pc.load_config(write(tmp_path, "[baseline_subtract]\nadc_to_pe = 2\n"))
    assert cfg.baseline_subtract.adc_to_pe == 2.0 and isinstance(
        cfg.baseline_subtract.adc_to_pe, float
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.baseline_subtract.baseline_window = 5  # type: ignore[misc]
    assert hash(cfg)


def test_explicit_cluster_types(tmp_path):
    cfg = pc.load_config(
        write(
            tmp_path, '[cluster]\ncluster_type = "scheduler"\nscheduler_address = "tcp://h:8786"\n'
        )
    )
    assert cfg.cluster.cluster_type == "scheduler" and cfg.cluster.n_workers is None
    cfg = pc.load_config(write(tmp_path, '[cluster]\ncluster_type = ""\nssh_hosts = ["a"]\n'))
    assert cfg.cluster.cluster_type == "ssh"


def test_with_overrides():
    cfg = pc.load_config(None)
    new = cfg.with_overrides("baseline_subtract", baseline_window=500, method=None)
    assert new.baseline_subtract.baseline_window == 500
    assert new.baseline_subtract.method == "clipped_mean"
    assert cfg.baseline_subtract.baseline_window == 200
    new = cfg.with_overrides(
        "cluster", cluster_type="scheduler", scheduler_address="tcp://127.0.0.1:8786"
    )
    assert new.cluster.cluster_type == "scheduler"


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "[pff_to_zarr]\ncodex = 'zstd'\n",
            "[pff_to_zarr] unknown key 'codex' (did you mean 'codec'?)",
        ),
        (
            "[cluster]\nssh_host = []\n",
            "[cluster] unknown key 'ssh_host' (did you mean 'ssh_hosts'?)",
        ),
        (
            "[pff_to_zarr]\nbaseline_window = 5\n",
            "[pff_to_zarr] unknown key 'baseline_window' (it belongs in [baseline_subtract])",
        ),
        ("[clustre]\nuse_dask = true\n", "unknown section [clustre] (did you mean [cluster]?)"),
        (
            "[foo]\n",
            "unknown section [foo] (valid sections: "
            "[cluster], [pff_to_zarr], [baseline_subtract], [run])",
        ),
        (
            "baseline_window = 5\n",
            "key baseline_window = 5 is outside any section (put it under [baseline_subtract])",
        ),
        ("cluster = 5\n", "[cluster] must be a table (a [cluster] section), got 5"),
        (
            '[baseline_subtract]\nbaseline_window = "200"\n',
            '[baseline_subtract] baseline_window must be an integer, got "200"',
        ),
        (
            "[baseline_subtract]\nbaseline_window = true\n",
            "[baseline_subtract] baseline_window must be an integer, got true",
        ),
        (
            "[baseline_subtract]\nbaseline_window = 200.0\n",
            "[baseline_subtract] baseline_window must be an integer, got 200.0",
        ),
        (
            "[baseline_subtract]\nadc_to_pe = true\n",
            "[baseline_subtract] adc_to_pe must be a number, got true",
        ),
        ("[cluster]\nuse_dask = 1\n", "[cluster] use_dask must be true or false, got 1"),
        (
            '[cluster]\nssh_hosts = "10.0.1.1"\n',
            '[cluster] ssh_hosts must be a list of non-empty strings, got "10.0.1.1"',
        ),
        (
            "[pff_to_zarr]\ncodec = 'lz5'\n",
            '[pff_to_zarr] codec = "lz5" is not one of "blosc-lz4", "zstd", "gzip", "none"',
        ),
        (
            "[baseline_subtract]\ncodec = 'zstandard'\n",
            '[baseline_subtract] codec = "zstandard" is not one of '
            '"blosc-lz4", "zstd", "gzip", "none" (did you mean "zstd"?)',
        ),
        ("[pff_to_zarr]\nlevel = 0\n", "[pff_to_zarr] level = 0 is out of range (1..9)"),
        ("[pff_to_zarr]\nlevel = 10\n", "[pff_to_zarr] level = 10 is out of range (1..9)"),
        (
            "[baseline_subtract]\nlevel = 10\n",
            "[baseline_subtract] level = 10 is out of range (1..9)",
        ),
        (
            "[baseline_subtract]\nbaseline_window = -5\n",
            "[baseline_subtract] baseline_window = -5 is out of range (>= 1)",
        ),
        ("[pff_to_zarr]\ntime_chunk = 0\n", "[pff_to_zarr] time_chunk = 0 is out of range (>= 1)"),
        (
            "[baseline_subtract]\nadc_to_pe = 0\n",
            "[baseline_subtract] adc_to_pe = 0.0 is out of range (> 0)",
        ),
        (
            "[baseline_subtract]\nsigma_threshold = nan\n",
            "[baseline_subtract] sigma_threshold must be a finite number, got NaN",
        ),
        ("[cluster]\nssh_port = 70000\n", "[cluster] ssh_port = 70000 is out of range (1..65535)"),
        (
            '[cluster]\ncluster_type = "ssh"\n',
            '[cluster] cluster_type = "ssh" needs a non-empty ssh_hosts list',
        ),
        (
            '[cluster]\ncluster_type = "scheduler"\n',
            '[cluster] cluster_type = "scheduler" needs scheduler_address (e.g. "tcp://10.0.0.1:8786")',
        ),
        (
            '[cluster]\ncluster_type = "local"\nssh_hosts = ["a"]\n',
            '[cluster] cluster_type = "local" but ssh_hosts is set: set cluster_type = "ssh" '
            "(or remove it) to use the hosts, or empty ssh_hosts",
        ),
        (
            '[cluster]\ncluster_type = "k8s"\n',
            '[cluster] cluster_type = "k8s" is not one of "local", "ssh", "slurm", "scheduler"',
        ),
        (
            "[cluster]\nmin_workers = 3\n",
            "[cluster] min_workers = 3 is more than the 2 workers requested",
        ),
        (
            '[cluster]\nssh_memory_per_worker = "16 gigs"\n',
            '[cluster] ssh_memory_per_worker = "16 gigs" is not a memory size '
            '(e.g. "4GB", "512MiB")',
        ),
        (
            '[cluster]\nlocal_memory_per_worker = "0GB"\n',
            '[cluster] local_memory_per_worker = "0GB" is not a memory size (e.g. "4GB", "512MiB")',
        ),
        (
            '[cluster]\ncluster_type = "slurm"\nslurm_walltime = "4 hours"\n',
            '[cluster] slurm_walltime = "4 hours" is not a SLURM time limit '
            '(e.g. "30", "04:00:00", "1-12:00:00")',
        ),
        (
            '[cluster]\ncluster_type = "slurm"\nslurm_cores = 2\nslurm_processes = 3\n',
            "[cluster] slurm_processes = 3 is more than slurm_cores = 2: each worker process "
            "needs a core",
        ),
        (
            '[cluster]\ncluster_type = "slurm"\nslurm_jobs = 2\nmin_workers = 3\n',
            "[cluster] min_workers = 3 is more than the 2 workers requested",
        ),
        (
            '[cluster]\ncluster_type = "slurm"\nslurm_memory = "lots"\n',
            '[cluster] slurm_memory = "lots" is not a memory size (e.g. "4GB", "512MiB")',
        ),
        (
            '[cluster]\ncluster_type = "slurm"\nssh_hosts = ["a"]\n',
            '[cluster] cluster_type = "slurm" but ssh_hosts is set: set cluster_type = "ssh" '
            "(or remove it) to use the hosts, or empty ssh_hosts",
        ),
        ("[run]\nstop_grace_s = 0\n", "[run] stop_grace_s = 0.0 is out of range (> 0)"),
        ('[run]\nstop_grace_s = "60"\n', '[run] stop_grace_s must be a number, got "60"'),
    ],
)
def test_each_problem_is_named(tmp_path, text, expected):
    assert one_problem(tmp_path, text) == expected


def test_choice_typo_suggests(tmp_path):
    assert one_problem(tmp_path, "[baseline_subtract]\nmethod = 'meadian'\n").endswith(
        '(did you mean "median"?)'
    )


def test_syntax_error_names_file_and_line(tmp_path):
    message = one_problem(tmp_path, "[cluster]\nuse_dask = true\nssh_hosts = [10.0.1.1]\n")
    assert message.startswith("line 3: invalid TOML: "), message


def test_duplicate_key_is_a_syntax_error(tmp_path):
    assert one_problem(tmp_path, "[run]\nl0_dir = ''\nl0_dir = 'x'\n").startswith(
        "line 3: invalid TOML"
    )


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.toml: config file not found"):
        pc.load_config(tmp_path / "nope.toml")


def test_directory_is_not_a_config(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        pc.load_config(tmp_path)


def test_all_problems_reported_at_once(tmp_path):
    text = (
        "[clustre]\n"
        "[cluster]\nssh_port = 0\n"
        "[pff_to_zarr]\ncodex = 'zstd'\nlevel = 10\n"
        "[baseline_subtract]\nbaseline_window = '200'\ncodec = 'lz5'\n"
        "[run]\ngroup_writable = 'yes'\n"
    )
    with pytest.raises(ConfigError) as info:
        pc.load_config(write(tmp_path, text))
    lines = str(info.value).splitlines()
    assert lines[0] == f"7 problems in {tmp_path / 'config.toml'}:"
    assert all(line.startswith(f"{tmp_path / 'config.toml'}: ") for line in lines[1:])
    for fragment in (
        "[clustre]",
        "ssh_port",
        "'codex'",
        "level = 10",
        "baseline_window",
        '"lz5"',
        "group_writable",
    ):
        assert sum(fragment in line for line in lines[1:]) == 1, fragment


def test_overrides_are_validated():
    cfg = pc.load_config(None)
    with pytest.raises(
        ConfigError,
        match=r"^<defaults> \+ override: \[baseline_subtract\] baseline_window = 0 is out",
    ):
        cfg.with_overrides("baseline_subtract", baseline_window=0)
    with pytest.raises(
        ConfigError, match=r"unknown key 'baseline_windw' \(did you mean 'baseline_window'\?\)"
    ):
        cfg.with_overrides("baseline_subtract", baseline_windw=5)
    with pytest.raises(ConfigError, match=r"unknown section \[baseline\]"):
        cfg.with_overrides("baseline", baseline_window=5)
    with pytest.raises(ConfigError, match="needs scheduler_address"):
        cfg.with_overrides("cluster", cluster_type="scheduler")


def test_direct_construction_is_validated():
    with pytest.raises(ConfigError, match=r"\[pff_to_zarr\] level = 0 is out of range"):
        pc.PffToZarrConfig(level=0)
    with pytest.raises(ConfigError, match="needs a non-empty ssh_hosts"):
        dataclasses.replace(pc.ClusterConfig(), cluster_type="ssh")
    assert pc.ClusterConfig(ssh_hosts=["h1"]).cluster_type == "ssh"


def test_every_default_is_valid_and_documented():
    for name, cls in pc._SECTIONS.items():
        cls()
        for fld in dataclasses.fields(cls):
            assert fld.metadata["key"].doc, f"[{name}] {fld.name} has no doc"


# --------------------------------------------------------------------------- CLI


def test_cli_check_ok(capsys):
    assert pc.main(["check", str(SHIPPED)]) == 0
    out, err = capsys.readouterr()
    assert out == f"config ok: {SHIPPED}\n" and err == ""


def test_cli_check_bad(tmp_path, capsys):
    path = write(tmp_path, "[pff_to_zarr]\nlevel = 10\ncodex = 'zstd'\n")
    assert pc.main(["check", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"panoseti_pipeline config: error: 2 problems in {path}:",
        f"{path}: [pff_to_zarr] level = 10 is out of range (1..9)",
        f"{path}: [pff_to_zarr] unknown key 'codex' (did you mean 'codec'?)",
    ]
    assert "Traceback" not in err


def test_cli_check_missing_and_syntax(tmp_path, capsys):
    assert pc.main(["check", str(tmp_path / "nope.toml")]) == 2
    assert (
        capsys.readouterr().err
        == f"panoseti_pipeline config: error: {tmp_path / 'nope.toml'}: config file not found\n"
    )
    assert pc.main(["check", str(write(tmp_path, "[run\n"))]) == 2
    assert ": line 1: invalid TOML" in capsys.readouterr().err


def test_cli_debug_raises(tmp_path):
    with pytest.raises(ConfigError):
        pc.main(["check", "--debug", str(tmp_path / "nope.toml")])


def test_cli_show_is_loadable_toml(tmp_path, capsys):
    assert pc.main(["show", str(write(tmp_path, ORIGINAL))]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith("# effective configuration of ")
    assert pc.from_dict(tomllib.loads(shown)) == dataclasses.replace(
        pc.load_config(tmp_path / "config.toml"), source="<defaults>"
    )


@pytest.mark.parametrize("text", [
    "4GB", "4 GB", "512MiB", "512 mib", "1.5 GiB", "100", "100B", "7kb", "7KiB", "2TB",
    "3 pib", " 8GB ", "0GB", "0.5B", "0.9 kB", "1e9", "5k", "5 foos", "GB", "", "4 G B",
    "4GBs", "-1GB", "1..5GB", "4\tGB", "4GB2",
])
def test_a_memory_size_is_judged_as_dask_reads_it(text: str) -> None:
    """Plain sizes are judged without importing dask: the same verdict as dask's."""
    from dask.utils import parse_bytes

    try:
        valid = parse_bytes(text) > 0
    except (ValueError, TypeError):
        valid = False
    assert pc._is_memory_size(text) == valid
