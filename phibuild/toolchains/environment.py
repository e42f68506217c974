"""Toolchain environments: each made from its lock the first time something needs it, in a temporary directory
renamed into place, under the user's cache directory, named by the digest of the lock, the interpreter and the
platform (``declare.Locked.environment_name``), and shared by every project on the machine, as pre-commit's
environments are. uv makes them (hard-linking from its cache, so environments that share torch store it once),
from the places pip installs from (``pipconfig``), checking every file against the lock's sha256.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ..errors import BuildError, ConfigError
from ..processes import alive
from . import pipconfig
from .declare import Locked, platform_tag, python_tag

log = logging.getLogger(__name__)

MARK = "phibuild-toolchain.json"  # written last, before the rename: an environment that has it is complete
CREATING = ".creating-"  # a creation in progress (or one that crashed: `doit gc` removes it)
FAILURE_LINES = 12  # of uv's output, in the one message of a failed creation


def root() -> Path:
    """Where environments live: ``$PHIBUILD_TOOLCHAINS``, else ``$XDG_CACHE_HOME/phibuild/toolchains``, else
    ``~/.cache/phibuild/toolchains``."""
    chosen = os.environ.get("PHIBUILD_TOOLCHAINS")
    if chosen is not None:
        path = Path(chosen)
        if not chosen or not path.is_absolute() or ".." in path.parts:
            raise ConfigError(f"PHIBUILD_TOOLCHAINS={chosen!r} must be an absolute path without '..'")
        return path
    cache = os.environ.get("XDG_CACHE_HOME")
    base = Path(cache) if cache and Path(cache).is_absolute() else Path.home() / ".cache"
    return base / "phibuild" / "toolchains"


def python(place: Path) -> Path:
    """The environment's interpreter."""
    return place / "bin" / "python"


def ensure(locked: Locked) -> Path:
    """The environment of ``locked``, made now if it is not there yet (one line says so, another how long it took)."""
    place = root() / locked.environment_name
    if (place / MARK).is_file():
        return place
    from filelock import FileLock

    root().mkdir(parents=True, exist_ok=True)
    with FileLock(str(root() / f".{locked.environment_name}.lock")):
        if (place / MARK).is_file():  # another process made it while this one waited
            return place
        if place.exists() or place.is_symlink():
            raise BuildError(f"{place} exists but is not a complete phibuild toolchain environment; phibuild does "
                             "not remove what it did not make: move it away and build again")
        _create(locked, place)
    return place


def _create(locked: Locked, place: Path) -> None:
    log.info("creating the %s toolchain (%d packages, from %s) in %s; once per machine", locked.name,
             len(locked.packages), locked.path.name, place.parent)
    started = time.monotonic()
    scratch = place.parent / f"{CREATING}{locked.environment_name}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        config = pipconfig.read()
        _uv(["venv", "--quiet", "--relocatable", "--python", sys.executable, str(scratch)], config, locked)
        _uv(["pip", "sync", "--python", str(python(scratch)), "--require-hashes", *config.uv_arguments(),
             str(locked.path)], config, locked)
        (scratch / MARK).write_text(json.dumps({"toolchain": locked.name, "lock": locked.digest,
                                                "python": python_tag(), "platform": platform_tag(),
                                                "packages": locked.packages}, indent=1, sort_keys=True) + "\n")
        scratch.rename(place)
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
    log.info("created the %s toolchain in %.0f s (%s)", locked.name, time.monotonic() - started, size(place))


def _uv(args: list[str], config: pipconfig.PipConfig, locked: Locked) -> None:
    """Run uv; a failure is one BuildError with the end of what uv said (which names the package and version)."""
    from uv import find_uv_bin

    env = {**os.environ, **config.uv_environment()}
    env.pop("VIRTUAL_ENV", None)
    run = subprocess.run([find_uv_bin(), *args], env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if run.returncode != 0:
        said = [line for line in (run.stderr or run.stdout).strip().splitlines() if line.strip()]
        raise BuildError(f"the {locked.name} toolchain cannot be created from {locked.path.name} here: "
                         + " / ".join(line.strip() for line in said[-FAILURE_LINES:]))


def made() -> list[Path]:
    """Every complete environment phibuild made under ``root()``."""
    with contextlib.suppress(OSError):
        return sorted(p for p in root().iterdir() if not p.is_symlink() and p.is_dir() and (p / MARK).is_file())
    return []


def remove(place: Path) -> None:
    """Remove an environment of phibuild's making (it has the mark, and is not reached through a symlink), or
    the leftovers of a creation that crashed."""
    if place.parent != root() or place.is_symlink() or not (
            (place / MARK).is_file() or place.name.startswith(CREATING)):
        raise BuildError(f"{place} is not a phibuild toolchain environment; it is kept")
    shutil.rmtree(place)


def leftovers() -> list[Path]:
    """Creations that crashed (their process is gone)."""
    found = []
    with contextlib.suppress(OSError):
        for path in root().iterdir():
            if path.name.startswith(CREATING) and not path.is_symlink():
                pid = path.name.rsplit("-", 2)[-2]
                if not pid.isdigit() or not alive(int(pid)):
                    found.append(path)
    return found


def size(place: Path) -> str:
    """The environment's size on disk, counting each hard-linked file once."""
    seen, total = set(), 0
    for base, _, files in os.walk(place):
        for name in files:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(base, name))
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_blocks * 512
    return f"{total / 1e9:.2f} GB" if total >= 1e8 else f"{total / 1e6:.0f} MB"
