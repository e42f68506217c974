"""Showing a file at another place without copying its bytes where the file system allows: how the store shows
entries under build/, and how a backend reuses a file it already made (GGUF's shared conversion)."""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

FICLONE = 0x40049409  # ioctl: share the source's blocks (btrfs, XFS, bcachefs)


def link_file(source: Path, target: Path, hardlink: bool = True) -> str:
    """Show ``source`` at ``target`` by reflink, else hardlink (if allowed), else a read-only copy; says which."""
    try:
        with open(source, "rb") as src, open(target, "wb") as dst:
            fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
        return "reflink"
    except OSError:
        target.unlink(missing_ok=True)
    if hardlink:
        try:
            os.link(source, target)
            return "hardlink"
        except OSError:
            pass
    shutil.copy2(source, target)
    target.chmod(0o444)
    return "copy"
