"""Cache keys: the digest of everything that can change an artifact's bytes, and nothing else.

The components are the source digest, the backend, the exact versions of the packages that produce the
output, the precision, every backend parameter and phibuild's recipe version. No paths, no timestamps:
the same inputs give the same key on any machine.
"""

from __future__ import annotations

from typing import Any

from .hashing import digest_json

RECIPE = 1  # bump when phibuild's own pipeline changes what any backend produces

# Lock entry field holding each key component.
LOCK_FIELDS = {
    "source": "source_digest",
    "backend": "backend",
    "versions": "versions",
    "precision": "precision",
    "params": "params",
    "recipe": "recipe",
}


def components(source_digest: str, backend: str, versions: dict[str, str], precision: str,
               params: dict[str, Any], backend_recipe: int) -> dict[str, Any]:
    return {
        "source": source_digest,
        "backend": backend,
        "versions": dict(versions),
        "precision": precision,
        "params": dict(params),
        "recipe": f"{RECIPE}.{backend_recipe}",
    }


def cache_key(parts: dict[str, Any]) -> str:
    return digest_json(parts)


def explain(entry: dict, parts: dict[str, Any]) -> list[str]:
    """What differs between a lock entry and freshly computed key components, one phrase each."""
    changes = []
    for part, field in LOCK_FIELDS.items():
        old, new = entry.get(field), parts[part]
        if old == new:
            continue
        if isinstance(new, dict) and isinstance(old, dict):
            for name in sorted(set(old) | set(new)):
                if old.get(name) != new.get(name):
                    changes.append(f"{part}: {name} {_show(old.get(name))} -> {_show(new.get(name))}")
        else:
            changes.append(f"{part}: {_show(old)} -> {_show(new)}")
    return changes


def _show(value: Any) -> str:
    if value is None:
        return "(none)"
    text = str(value)
    return text[:12] + "..." if len(text) == 32 and text.isalnum() else text
