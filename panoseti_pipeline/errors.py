"""The pipeline's exceptions and how the command-line scripts report them.

Every error a user can cause (bad input, bad configuration, an output that cannot be
written, a cluster that does not come up) is a :class:`PipelineError` whose message is
one pre-formatted line: what went wrong, where (file, byte offset, key), and what to do.
Each subclass also inherits the matching builtin so callers may catch ``ValueError`` or
``OSError`` as usual.

Exit codes shared by every script (DESIGN.md §8, STYLE.md):

* ``0`` every requested output was written and verified;
* ``1`` an input or a step failed (after all other inputs were tried);
* ``2`` usage or configuration error, found before any work;
* ``130`` interrupted (SIGINT/SIGTERM).
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import sys
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

T = TypeVar("T")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class PipelineError(Exception):
    """Base class: an error whose message is the whole, user-facing explanation."""

    exit_code = EXIT_FAILED


class PFFFormatError(PipelineError, ValueError):
    """The bytes of a file are not (or no longer) valid PFF frames."""


class PFFNameError(PipelineError, ValueError):
    """A path does not follow the PFF file or ``.pffd`` directory naming."""


class ConfigError(PipelineError, ValueError):
    """A configuration file or option is invalid; found before any work starts.

    ``problems`` holds one line per problem (the message may add a heading line), so a
    caller listing problems of several sources counts them right.
    """

    exit_code = EXIT_USAGE

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems if problems is not None else [message]


class InputError(PipelineError, OSError):
    """An input is missing, unreadable, empty, or not what the step expects."""


class StoreError(PipelineError, RuntimeError):
    """A Zarr product could not be written, verified or published."""


class ClusterError(PipelineError, RuntimeError):
    """The Dask cluster could not be started, reached or used."""


class Interrupted(PipelineError):
    """SIGTERM arrived; raised so that ``finally`` blocks clean up as for Ctrl-C."""

    exit_code = EXIT_INTERRUPTED


#: the signals that arrived while :func:`run_main` ran its body
_signals: list[int] = []


def _raise_interrupted(signum: int, _frame: object) -> None:
    _signals.append(signum)
    raise Interrupted(f"stopped by signal {signal.Signals(signum).name}")


def _unraisable(hook: Callable[[Any], None]) -> Callable[[Any], None]:
    """``hook``, except for :class:`Interrupted` raised where Python can only ignore it
    (a weakref callback, ``__del__``, an import lock): no traceback for that, the
    signal is reported by :func:`run_main`."""

    def quiet(unraisable: Any) -> None:
        if not isinstance(unraisable.exc_value, Interrupted):
            hook(unraisable)

    return quiet


def run_main(body: Callable[[], int], prog: str, debug: bool) -> int:
    """Run a script's body and map exceptions to one stderr line and an exit code.

    SIGTERM is turned into :class:`Interrupted` so that cleanup code (removing a
    partial store, closing a Dask client) runs exactly as it does for Ctrl-C; a script
    run.sh started gets it when run.sh dies (:mod:`.parent_death`). Where Python
    swallowed that exception (it arrived inside a callback), whatever failed next is
    reported as the interruption it is. Tracebacks only with ``--debug``.

    stderr is line-buffered, also under ``PYTHONUNBUFFERED``: each line is one write, so the
    lines of steps running side by side (run.sh's lanes) never cut into each other.
    """
    _signals.clear()
    if isinstance(sys.stderr, io.TextIOWrapper):
        sys.stderr.reconfigure(line_buffering=True, write_through=False)
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    previous_hook = sys.unraisablehook
    sys.unraisablehook = _unraisable(previous_hook)
    try:
        return reported(body, prog, debug)
    finally:
        signal.signal(signal.SIGTERM, previous)
        sys.unraisablehook = previous_hook


def reported(body: Callable[[], int], prog: str, debug: bool) -> int:
    """``body()``, or the one stderr line and exit code of what it raised (``run_main``'s
    mapping, also for the parts of a command that go on after one fails)."""
    try:  # (the import too: a SIGTERM may come while the process is still starting)
        from panoseti_pipeline.parent_death import stop_with_parent

        stop_with_parent()
        return body()
    except KeyboardInterrupt:
        if debug:
            raise
        _report(prog, "interrupted")
        return EXIT_INTERRUPTED
    except PipelineError as err:
        if debug:
            raise
        if _signals and not isinstance(err, Interrupted):
            err = Interrupted(f"stopped by signal {signal.Signals(_signals[-1]).name}")
        _report(prog, f"error: {err}")
        return err.exit_code
    except OSError as err:  # disk full, permission denied ... : name the file
        if debug:
            raise
        where = f"{err.filename}: " if err.filename else ""
        _report(prog, f"error: {where}{err.strerror or err}")
        return EXIT_FAILED
    except Exception as err:  # a bug or a library error: still one line, no traceback
        if debug:
            raise
        if _signals:
            _report(prog, f"error: stopped by signal {signal.Signals(_signals[-1]).name}")
            return EXIT_INTERRUPTED
        text = " ".join(str(err).split()) or "(no message)"
        _report(prog, f"error: unexpected {type(err).__name__}: {text} (rerun with --debug "
                "for the traceback)")
        return EXIT_FAILED


def report_each(items: Iterable[T], handle: Callable[[T], object], prog: str, debug: bool,
                errors: tuple[type[BaseException], ...] = (PipelineError,)) -> int:
    """``handle`` every item of a command given several (files, stores): one that raises
    ``errors`` is one error line and the others still run. EXIT_FAILED if any failed."""
    failed = 0
    for item in items:
        try:
            handle(item)
        except errors as err:
            if debug:
                raise
            print(f"{prog}: error: {err}", file=sys.stderr)
            failed += 1
    return EXIT_FAILED if failed else EXIT_OK


#: Environment variable naming a file that receives a script's final error line too:
#: run.sh reads it into the summary and the run record as the failed step's reason.
ERROR_FILE_ENV = "PANOSETI_ERROR_FILE"


def _report(prog: str, message: str) -> None:
    """The one line a failed script prints (and leaves where ERROR_FILE_ENV says)."""
    print(f"{prog}: {message}", file=sys.stderr)
    path = os.environ.get(ERROR_FILE_ENV)
    if path:
        with contextlib.suppress(OSError), open(path, "w", encoding="utf-8") as f:
            f.write(message.removeprefix("error: ") + "\n")

