"""Test-only plugin: slows chosen points of the pipeline so kill and signal tests hit them.

Python imports ``sitecustomize`` at start-up from the first directory on ``sys.path``
that has one. A test that puts this directory on PYTHONPATH of a command (run.sh, a step
script; ``tests/fault_tools.py: with_plugin``) gets the plugin in that process and in
every process it starts with that environment (the cluster manager, its Dask workers).
The variables are read here only, never by the pipeline:

``TEST_PLUGIN_SLOW_TASK_S=SECONDS``
    each step-1 task (``step1.convert_range``) and each step-2 apply task
    (``step2.subtract.apply_task``) sleeps first;
``TEST_PLUGIN_SLOW_PUBLISH_S=SECONDS[:NAME_SUFFIX]``
    a verified store whose final name ends with NAME_SUFFIX is held just before its
    rename into place (``store.publish.swap_into_place``);
``TEST_PLUGIN_DEPRECATION_ON_IMPORT=MODULE``
    importing MODULE (e.g. ``asyncssh``) warns as cryptography >= 51 does when asyncssh
    imports its DSA types (``CryptographyDeprecationWarning``): the newest releases'
    noise, whatever versions are installed.

A wrapper replaces the function in its module when that module is imported, and keeps
the function's name and module (functools.wraps): Dask pickles it by reference, and a
worker, which has the plugin too, runs its own wrapper.
"""

from __future__ import annotations

import functools
import importlib.abc
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

SLOW_TASK = "TEST_PLUGIN_SLOW_TASK_S"
SLOW_PUBLISH = "TEST_PLUGIN_SLOW_PUBLISH_S"
DEPRECATION_ON_IMPORT = "TEST_PLUGIN_DEPRECATION_ON_IMPORT"
AFTER_IMPORT = "<after import>"


def _sleep_first(fn: Callable[..., Any], seconds: float) -> Callable[..., Any]:
    @functools.wraps(fn)
    def slowed(*args: Any, **kwargs: Any) -> Any:
        time.sleep(seconds)
        return fn(*args, **kwargs)

    return slowed


def _hold_before(fn: Callable[..., Any], seconds: float, suffix: str) -> Callable[..., Any]:
    @functools.wraps(fn)
    def held(tmp: Path, final: Path, *rest: Any) -> Any:
        if final.name.endswith(suffix):
            time.sleep(seconds)
        return fn(tmp, final, *rest)

    return held


def _warn_deprecated(module: ModuleType) -> None:
    from cryptography.utils import CryptographyDeprecationWarning

    warnings.warn("DSA is deprecated and support will be removed in a future release. "
                  "Use a more modern signature algorithm.", CryptographyDeprecationWarning,
                  stacklevel=2)


def _wanted() -> dict[str, dict[str, Callable[[Callable[..., Any]], Callable[..., Any]]]]:
    """module -> {function name: wrap} for what the environment asks (the name
    :data:`AFTER_IMPORT`: a function called with the module once it has run)."""
    out: dict[str, dict[str, Callable[[Callable[..., Any]], Callable[..., Any]]]] = {}
    task = os.environ.get(SLOW_TASK)
    if task:
        def slow(fn: Callable[..., Any]) -> Callable[..., Any]:
            return _sleep_first(fn, float(task))

        out["panoseti_pipeline.step1"] = {"convert_range": slow}
        out["panoseti_pipeline.step2.subtract"] = {"apply_task": slow}
    publish = os.environ.get(SLOW_PUBLISH)
    if publish:
        seconds, _, suffix = publish.partition(":")

        def hold(fn: Callable[..., Any]) -> Callable[..., Any]:
            return _hold_before(fn, float(seconds), suffix)

        out["panoseti_pipeline.store.publish"] = {"swap_into_place": hold}
    noisy = os.environ.get(DEPRECATION_ON_IMPORT)
    if noisy:
        out[noisy] = {AFTER_IMPORT: _warn_deprecated}
    return out


class _WrapOnImport(importlib.abc.MetaPathFinder):
    """Finds a chosen module as the other finders do, and wraps its functions once it
    has been executed."""

    def __init__(self, wanted: dict[str, dict[str, Callable[..., Any]]]) -> None:
        self.wanted = wanted

    def find_spec(self, name: str, path: Any, target: ModuleType | None = None) -> Any:
        if name not in self.wanted:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                break
        else:
            return None
        run = spec.loader.exec_module
        wraps = self.wanted[name]

        def exec_and_wrap(module: ModuleType) -> None:
            run(module)
            for attr, wrap in wraps.items():
                if attr == AFTER_IMPORT:
                    wrap(module)
                else:
                    setattr(module, attr, wrap(getattr(module, attr)))

        spec.loader.exec_module = exec_and_wrap
        return spec


_wanted_now = _wanted()
if _wanted_now:
    sys.meta_path.insert(0, _WrapOnImport(_wanted_now))
