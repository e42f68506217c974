"""Release bundles: chosen artifacts in one directory, a model card each, and a SHA256SUMS over all of it.

Anyone can check a bundle with ``sha256sum -c SHA256SUMS`` and compare its sums with ``artifacts.lock``.
The bundle is assembled beside the old one and swapped in by rename, like the visible artifacts.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from . import __version__, backends
from .errors import BuildError
from .project import Project
from .store import new_dir, removed_on_failure, swap_in

CARD = "MODEL_CARD.md"


def release(project: Project, names: list[str], directory: Path) -> list[str]:
    """Gather ``names`` (locked artifacts) into ``directory``; returns the lines of SHA256SUMS."""
    lock = project.lock.read()
    missing = [name for name in names if name not in lock]
    if missing:
        raise BuildError(f"not in artifacts.lock, build them first: {', '.join(missing)}")
    directory.parent.mkdir(parents=True, exist_ok=True)
    with removed_on_failure(new_dir(directory.parent, f".{directory.name}.")) as staging:
        sums: dict[str, str] = {}  # path in the bundle -> sha256
        for name in sorted(names):
            entry = lock[name]
            stored = project.store.get(entry["key"])
            if stored is None or project.store.damaged_files(stored, entry["files"]):
                raise BuildError(f"{name}: the store does not hold the locked files; run `doit quantize:{name}`")
            project.store.link_visible(stored, staging / name, backends.get(entry["backend"]).unlinkable)
            card = staging / name / CARD
            card.write_text(model_card(name, entry))
            sums.update({f"{name}/{file}": want["sha256"] for file, want in entry["files"].items()})
            sums[f"{name}/{CARD}"] = hashlib.sha256(card.read_bytes()).hexdigest()
        lines = [f"{digest}  {path}" for path, digest in sorted(sums.items())]
        (staging / "SHA256SUMS").write_text("\n".join(lines) + "\n")
        swap_in(staging, directory)
    return lines


def model_card(name: str, entry: dict) -> str:
    """A short card: where the model came from, what made it, what it is and how it ran."""
    size = sum(file["size"] for file in entry["files"].values())
    source = entry["source"]
    if entry.get("revision"):
        source += f" at commit {entry['revision']}"
    versions = ", ".join(f"{package} {version}" for package, version in sorted(entry["versions"].items()))
    params = ", ".join(f"{key} = {value}" for key, value in sorted(entry["params"].items()))
    files = "\n".join(f"| `{file}` | {want['size']} | `{want['sha256']}` |"
                      for file, want in sorted(entry["files"].items()))
    return f"""# {name}

| | |
|---|---|
| source model | {entry['model']} ({source}) |
| source digest (xxh3-128 of its files) | `{entry['source_digest']}` |
| backend | {entry['backend']}: {versions} |
| precision | {entry['precision']} ({params}) |
| size | {size} bytes ({size / 2**20:.1f} MiB) |
| smoke check | {entry['smoke']} |
| cache key | `{entry['key']}` |
| built by | phibuild {__version__}, recipe {entry['recipe']} |

| file | bytes | sha256 |
|---|---|---|
{files}

Check the files with `sha256sum -c SHA256SUMS` in the release directory.
"""

