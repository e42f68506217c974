"""Resolving a toolchain's declaration into its locks (``doit toolchains --upgrade NAME``): uv's
``pip compile --generate-hashes`` for each platform phibuild supports, from the places pip installs from,
written into a temporary file, checked, and renamed into place."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

from .. import reading
from ..errors import BuildError
from . import pipconfig
from .declare import PLATFORMS, declaration, lock_file, packages, python_tag

log = logging.getLogger(__name__)


def upgrade(name: str) -> list[Path]:
    """Resolve toolchain ``name`` anew, at the newest versions its declaration allows, for this interpreter on
    every platform of ``PLATFORMS``; returns the locks written. A platform that cannot be resolved is said and
    left as it was."""
    from uv import find_uv_bin

    config = pipconfig.read()
    written = []
    version = python_tag().partition("-")[2]
    for platform, (uv_platform, os_version) in PLATFORMS.items():
        path = lock_file(name, platform=platform)
        scratch = path.with_name(f".{path.name}.{os.getpid()}")
        try:
            run = subprocess.run(
                [find_uv_bin(), "pip", "compile", str(declaration(name)), "--generate-hashes", "--no-header",
                 "--quiet", "--python-version", version, "--python-platform", uv_platform,
                 *config.uv_arguments(), "--output-file", str(scratch)],
                env={**os.environ, **config.uv_environment(), **os_version}, stdin=subprocess.DEVNULL,
                capture_output=True, text=True)
            if run.returncode != 0:
                said = " / ".join(line.strip() for line in run.stderr.strip().splitlines()[-6:])
                log.warning("toolchain %s cannot be resolved for %s: %s", name, platform, said)
                continue
            text = reading.read_text(scratch, "toolchain lock")
            found = packages(text, str(scratch))
            header = (f"# The {name} toolchain for {python_tag()} on {platform}: `doit toolchains --upgrade {name}` "
                      f"resolves it from requirements.in.\n")
            scratch.write_text(header + text)
            os.replace(scratch, path)
        except OSError as exc:
            raise BuildError(f"cannot write {path}: {exc}") from None
        finally:
            scratch.unlink(missing_ok=True)
        log.info("toolchain %s for %s: %d packages in %s", name, platform, len(found), path.name)
        written.append(path)
    return written
