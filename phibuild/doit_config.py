"""One line, not a traceback, when doit cannot parse a project's pyproject.toml or its own command line.

doit reads ``[tool.doit]`` from pyproject.toml while it builds its main object (``DoitMain.__init__`` ->
``DoitConfig.loads`` -> ``load_config_toml``), before any command, loader or dodo.py of ours is loaded, so nothing
of phibuild's runs in time to catch the TOML error there. ``phibuild.pth`` imports this module when the
interpreter starts; it installs a ``sys.excepthook`` that says such an error in one line and exits with doit's
status for errors before tasks run (3). It does the same for the IndexError doit's ``process_args`` raises on an
empty command-line argument (``--slices ""``). Every other exception goes to the hook that was there before,
unchanged. ``phibuild.tasks.run`` (doit in-process) catches the same errors itself.
"""

import sys

_previous = sys.excepthook
EMPTY_ARGUMENT = "an empty argument on the command line; give an option its value as --name=VALUE"


def _doit_frame(tb) -> str | None:
    """The name of the function of doit's start-up (reading pyproject.toml or the command line) that raised."""
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name in ("load_config_toml", "process_args") and code.co_filename.replace(
                "\\", "/").endswith("/doit/doit_cmd.py"):
            return code.co_name
        tb = tb.tb_next
    return None


def _hook(kind, exc, tb) -> None:
    where = _doit_frame(tb)
    if where == "process_args" and issubclass(kind, IndexError):
        sys.stderr.write(f"ERROR: {EMPTY_ARGUMENT}\n")
    elif where == "load_config_toml" and issubclass(kind, Exception):
        sys.stderr.write(f"ERROR: pyproject.toml {said(kind, exc)}\n")
    else:
        _previous(kind, exc, tb)
        return
    sys.stderr.flush()
    raise SystemExit(3)


def said(kind: type, exc: BaseException) -> str:
    """What is wrong with pyproject.toml, as doit met it."""
    if issubclass(kind, RecursionError):
        return "is nested too deeply to read"
    if issubclass(kind, ValueError):  # tomllib.TOMLDecodeError, or an integer too long to convert
        return f"is not valid TOML: {str(exc)[:200]}"
    return f"has a [tool] or [tool.doit] table doit cannot use ({type(exc).__name__}: {str(exc)[:200]})"


sys.excepthook = _hook
