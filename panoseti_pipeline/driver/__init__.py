"""The Python side of ``run.sh``; bash keeps the processes, signals and cleanup.

``plan``
    inputs -> jobs and every check made before any work (free space, interface, ...);
    the plan printed for bash or, with ``--dry-run``, for people.
``record``
    the run's state file, per-step marks, the summary table and the TOML run record.
``demo``
    the observation and config of ``run.sh --demo``.
``cli``
    the subcommands run.sh calls: ``python3 -m panoseti_pipeline driver ...``.
"""
