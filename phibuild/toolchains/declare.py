"""Which toolchains phibuild has, and what each one is: its declaration and its hashed locks.

Each toolchain is a folder here: ``requirements.in``, its top-level requirements, and one lock per interpreter
and platform (``cpython-3.11-linux-x86_64.txt``), resolved from it by ``doit toolchains --upgrade NAME`` with
a sha256 for every file. The lock is the toolchain: its digest names its environment and enters the key of
everything built with it.
"""

from __future__ import annotations

import functools
import hashlib
import platform
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from .. import reading
from ..errors import ConfigError

DIRECTORY = Path(__file__).parent
NAMES = ("onnx", "gguf", "openvino", "mlx", "fidelity")
# The platforms locks are resolved for, as uv names them, with the oldest OS they are resolved for (glibc 2.35:
# mlx's Linux wheels; macOS 14: mlx's), which uv reads from MACOSX_DEPLOYMENT_TARGET.
PLATFORMS = {"linux-x86_64": ("x86_64-manylinux_2_35", {}), "linux-aarch64": ("aarch64-manylinux_2_35", {}),
             "darwin-arm64": ("aarch64-apple-darwin", {"MACOSX_DEPLOYMENT_TARGET": "14.0"})}
PINNED = re.compile(r"^([a-z0-9][a-z0-9._-]*)==(\S+?)(?:\s+;[^\\]*)?\s*\\?$", re.MULTILINE)


def python_tag() -> str:
    """The interpreter, as keys and lock names record it: implementation and minor version."""
    return f"{sys.implementation.name}-{sys.version_info.major}.{sys.version_info.minor}"


def platform_tag() -> str:
    """The operating system and processor architecture, as in ``linux-x86_64``."""
    return f"{sys.platform}-{platform.machine().lower()}"


def declaration(name: str) -> Path:
    """The toolchain's top-level requirements."""
    return DIRECTORY / name / "requirements.in"


def lock_file(name: str, python: str | None = None, platform: str | None = None) -> Path:
    """The toolchain's lock for ``python`` and ``platform`` (default: this interpreter and machine)."""
    return DIRECTORY / name / f"{python or python_tag()}-{platform or platform_tag()}.txt"


@dataclass(frozen=True)
class Locked:
    """A toolchain's lock as read here: what its environment holds, and the digest that names it."""

    name: str
    path: Path
    digest: str  # sha256 of the lock file
    packages: dict[str, str]  # distribution -> exact version

    @property
    def environment_name(self) -> str:
        """The environment's directory name: the toolchain and a digest of the lock, interpreter and platform."""
        who = f"{self.digest}\0{python_tag()}\0{platform_tag()}\0{sys.version}"
        return f"{self.name}-{hashlib.sha256(who.encode()).hexdigest()[:16]}"


@functools.cache
def locked(name: str) -> Locked:
    """The toolchain ``name``'s lock for this interpreter and platform, read and checked."""
    if name not in NAMES:
        raise ConfigError(f"phibuild has no toolchain {name!r}; it has {', '.join(NAMES)}")
    path = lock_file(name)
    try:
        data = reading.read_bytes(path, "toolchain lock")
    except FileNotFoundError:
        have = sorted(p.stem for p in (DIRECTORY / name).glob("*.txt"))
        raise ConfigError(f"toolchain {name} has no lock for {python_tag()} on {platform_tag()} (phibuild has "
                          f"{', '.join(have) or 'none'}); `doit toolchains --upgrade {name}` resolves one "
                          "here") from None
    except (OSError, reading.Unreadable) as exc:
        raise ConfigError(f"toolchain {name}'s lock {path} cannot be read ({exc})") from None
    return Locked(name, path, hashlib.sha256(data).hexdigest(), packages(data.decode(errors="replace"), str(path)))


def packages(text: str, where: str) -> dict[str, str]:
    """``name==version`` of every package a lock pins; a lock that pins nothing, or a package twice, is refused."""
    from .. import validate as v

    found: dict[str, str] = {}
    for name, version in PINNED.findall(text):
        if name in found:
            raise ConfigError(f"{where} pins {name} twice")
        try:
            found[v.distribution(name, where)] = v.version(version, f"{where}: {name}")
        except v.Invalid as exc:
            raise ConfigError(str(exc)) from None
    if not found:
        raise ConfigError(f"{where} pins no package: it is not a toolchain lock")
    return dict(sorted(found.items()))
