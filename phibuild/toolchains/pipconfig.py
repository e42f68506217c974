"""The machine's package configuration, as pip reads it, given to uv (which does not read pip's files).

pip's files are read in pip's order (global, user, site, then ``PIP_CONFIG_FILE``; ``[global]`` then
``[install]``), then its ``PIP_*`` variables: index URLs, find-links, certificates and trusted hosts reach uv as
its own arguments and variables, so an environment comes from the places pip would install from. pip merges
every index's versions, so uv is told to as well (``unsafe-best-match``).
"""

from __future__ import annotations

import configparser
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .. import reading

SECTIONS = ("global", "install")
LISTS = ("extra-index-url", "find-links", "trusted-host")
SINGLE = ("index-url", "no-index", "cert", "client-cert")


@dataclass
class PipConfig:
    """The settings of pip's that say where packages come from."""

    values: dict[str, str] = field(default_factory=dict)
    lists: dict[str, list[str]] = field(default_factory=dict)

    def uv_arguments(self) -> list[str]:
        """uv pip's arguments for the same sources."""
        args = ["--index-strategy", "unsafe-best-match"]
        if "index-url" in self.values:
            args += ["--index-url", self.values["index-url"]]
        for url in self.lists.get("extra-index-url", []):
            args += ["--extra-index-url", url]
        for place in self.lists.get("find-links", []):
            args += ["--find-links", place]
        for host in self.lists.get("trusted-host", []):
            args += ["--allow-insecure-host", host]
        if _true(self.values.get("no-index", "")):
            args.append("--no-index")
        return args

    def uv_environment(self) -> dict[str, str]:
        """Variables uv reads for what pip takes as options (certificates)."""
        found = {}
        if "cert" in self.values:
            found["SSL_CERT_FILE"] = self.values["cert"]
        if "client-cert" in self.values:
            found["SSL_CLIENT_CERT"] = self.values["client-cert"]
        return found


def read(environ: dict[str, str] | None = None) -> PipConfig:
    """pip's configuration on this machine: its files, then its variables, the later winning."""
    environ = dict(os.environ if environ is None else environ)
    config = PipConfig()
    for path in _files(environ):
        parser = configparser.RawConfigParser()
        try:
            parser.read_string(reading.read_text(path, "pip configuration"), str(path))
        except (FileNotFoundError, PermissionError, IsADirectoryError):
            continue
        except (OSError, reading.Unreadable, configparser.Error, UnicodeDecodeError):
            continue  # pip would stop here too; uv then uses its own defaults, and an install says what it misses
        for section in SECTIONS:
            if parser.has_section(section):
                for key, value in parser.items(section):
                    _set(config, key.replace("_", "-"), value)
    for key in (*LISTS, *SINGLE):
        value = environ.get("PIP_" + key.upper().replace("-", "_"))
        if value is not None:
            _set(config, key, value)
    return config


def _set(config: PipConfig, key: str, value: str) -> None:
    if key in LISTS:
        config.lists[key] = value.split()
    elif key in SINGLE:
        config.values[key] = value.strip()


def _files(environ: dict[str, str]) -> list[Path]:
    """pip's configuration files, in the order pip reads them (later ones win)."""
    chosen = environ.get("PIP_CONFIG_FILE")
    if chosen == os.devnull:
        return []
    dirs = environ.get("XDG_CONFIG_DIRS") or "/etc/xdg"
    home = Path(environ.get("HOME") or Path.home())
    user = Path(environ.get("XDG_CONFIG_HOME") or home / ".config")
    files = [Path(d) / "pip" / "pip.conf" for d in reversed(dirs.split(os.pathsep)) if d]
    files += [Path("/etc/pip.conf"), home / ".pip" / "pip.conf", user / "pip" / "pip.conf",
              Path(sys.prefix) / "pip.conf"]
    if chosen:
        files.append(Path(chosen))
    return files


def _true(value: str) -> bool:
    return value.strip().lower() in ("1", "yes", "true", "on")
