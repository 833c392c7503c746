"""Helpers used by the launch API: argument escaping, event loops, paths.

Mostly internal. `ShellSafeArg` and `run_in_asyncio_loop` are public (exported
from `xm`); `set_launch_script` lets a command-line front end say which file
relative paths in a launcher refer to.
"""

from __future__ import annotations

import abc
import enum
import functools
import os
import shlex
import sys

TYPE_CHECKING = False  # typing is not imported at run time: it is slow to import
if TYPE_CHECKING:
    from typing import Any, Callable, Optional


class ValueObject:
    """Equality and a dataclass-style repr from the attributes ``__init__`` sets.

    Classes write a plain ``__init__`` rather than use ``dataclasses``:
    generating and compiling the methods of each decorated class took a third
    of the time of ``import lxm3``. Attributes named with a leading ``_`` are
    private state, left out of both.
    """

    _repr_hidden: tuple = ()  # public attributes too bulky to show
    __hash__ = None  # mutable, so unhashable, as a dataclass with eq=True

    def _fields(self) -> dict:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._fields() == other._fields()  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        shown = (f"{k}={v!r}" for k, v in self._fields().items() if k not in self._repr_hidden)
        return f"{type(self).__qualname__}({', '.join(shown)})"


class SpecialArg(abc.ABC):  # noqa: B024 - an abstract marker, as upstream
    """Base class for arguments that serialise in a special way."""


class ShellSafeArg(ValueObject, SpecialArg):
    """A command-line argument passed to the shell without quoting.

    Arguments are normally quoted so that they reach the program verbatim.
    Wrap one in `ShellSafeArg` to let the shell expand it, e.g.
    `ShellSafeArg('$HOME')` or `ShellSafeArg('${SLURM_ARRAY_TASK_ID}')`.
    """

    def __init__(self, arg: str) -> None:
        self.arg = arg

    def __str__(self) -> str:
        # An f-string would silently turn this into an ordinary (quoted) value.
        raise RuntimeError(f"Converting {self!r} to a string would strip the ShellSafe semantics.")


def ARG_ESCAPER(value: Any) -> str:  # upper case: the name upstream exports
    """Renders one argument value for a POSIX shell command line.

    `ShellSafeArg` is left alone, an `Enum` renders as its member name and
    anything else as the shell-quoted `str(value)`.
    """
    if isinstance(value, ShellSafeArg):
        return value.arg
    if isinstance(value, enum.Enum):
        return shlex.quote(str(value.name))
    return shlex.quote(str(value))


def trivial_kwargs_joiner(key: str, value: str) -> str:
    """Joins a rendered flag and its rendered value as `key=value`."""
    return f"{key}={value}"


def run_in_asyncio_loop(f: Callable[..., Any]) -> Callable[..., Any]:
    """Turns an async function into a synchronous one that runs it to completion.

    Meant for tests (`@run_in_asyncio_loop async def test_...`) and for a
    launcher's `main`. Each call runs in a fresh event loop, which is closed
    afterwards; no child watcher is involved, so it works on every Python 3.
    """

    @functools.wraps(f)
    def decorated(*args: Any, **kwargs: Any) -> Any:
        import asyncio

        loop = asyncio.new_event_loop()
        try:
            return loop.run_until_complete(f(*args, **kwargs))
        finally:
            close_event_loop(loop)

    return decorated


def close_event_loop(loop: Any) -> None:
    """Closes a stopped event loop cleanly, like `asyncio.run` does.

    Leftover tasks are cancelled, callbacks already queued (e.g. results on
    their way to futures) run, async generators are finalised; closing then
    releases the loop's file descriptors.
    """
    import asyncio

    async def let_queued_callbacks_run() -> None:
        for _ in range(3):
            await asyncio.sleep(0)

    try:
        pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(let_queued_callbacks_run())
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()


# --- Launch script and relative paths --------------------------------------

_launch_script: Optional[str] = None


def _initial_cwd() -> str:
    try:
        return os.getcwd()
    except OSError:  # the working directory was removed
        return os.sep


# Relative `sys.argv[0]` is relative to where the program started, which may
# differ from the working directory by the time paths are resolved.
_START_DIR = _initial_cwd()


def set_launch_script(path: Optional[str]) -> None:
    """Declares the launcher file that relative paths are resolved against.

    A front end that imports the launcher (rather than running it as
    `__main__`) calls this; `None` goes back to guessing from `sys.argv[0]`.
    """
    global _launch_script
    if path is None:
        _launch_script = None
    else:
        _launch_script = os.path.join(_START_DIR, os.fspath(path))


def find_launch_script_path() -> str:
    """Returns the absolute path of the launcher script, or '' if there is none.

    In order: the path given to `set_launch_script`; `sys.argv[0]` when it is
    a `.py` file; the `__main__` module's file. Interactive sessions and
    `python -c` have no script.
    """
    if _launch_script:
        return os.path.abspath(_launch_script)
    script = sys.argv[0] if sys.argv else ""
    if not script.endswith(".py"):
        main_file = getattr(sys.modules.get("__main__"), "__file__", None)
        if main_file and os.access(main_file, os.R_OK):
            script = main_file
    if not script or script in ("-", "-c", "-m"):
        return ""
    return os.path.abspath(os.path.join(_START_DIR, script))


def resolve_path_relative_to_launcher(path: str) -> str:
    """Makes `path` absolute, treating a relative one as relative to the launcher.

    This lets a launcher refer to its own directory as `.` wherever it is run
    from. Without a launcher script (interactive use) the start directory is
    used instead.

    Raises:
      RuntimeError: if the launcher script can no longer be found.
    """
    path = os.fspath(path)
    if os.path.isabs(path):
        return path
    script = find_launch_script_path()
    if not script:
        return os.path.realpath(os.path.join(_START_DIR, path))
    if not os.access(script, os.R_OK):
        raise RuntimeError(
            "Unable to determine launch script path. "
            f"The script is not present at {script!r}. "
            "This may happen if launch script changes the working directory."
        )
    base = os.path.dirname(os.path.realpath(script))
    return os.path.realpath(os.path.join(base, path))


get_absolute_path = resolve_path_relative_to_launcher
