"""A store shared between machines, on any fsspec filesystem: a directory, S3, GCS, Azure, HTTP (read-only).

Layout under the remote's root::

    blobs/ab/<xxh3-128>      file contents, by digest: immutable, so concurrent uploads cannot clash
    keys/ab/<key>.json       the manifest of one store entry: its files' sizes and digests

A key is published by writing its manifest last, in one atomic step (a rename on filesystems, one PUT on
object stores), after every blob it names: no reader ever sees half an entry. Nothing pulled is trusted:
every file is checked against the manifest, and the manifest against ``artifacts.lock`` when the lock pins
the key. A remote that cannot be reached, is too slow to answer or fails mid-way is reported once as a
warning and the build goes on locally; credentials come from the filesystem's usual environment
(``AWS_*``, ``GOOGLE_APPLICATION_CREDENTIALS``, ``AZURE_STORAGE_*``).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

from .hashing import hash_file
from .store import Entry, Store

# Protocols whose single PUT is atomic: a blob or manifest is written in place, not renamed.
OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"}


class Remote:
    def __init__(self, url: str, options: dict[str, Any] | None = None, timeout: float = 10.0):
        self.url = url
        self.options = dict(options or {})
        self.timeout = timeout
        self._fs = None
        self._root = ""
        self._usable: bool | None = None

    # -- reachability ----------------------------------------------------------------------------

    def usable(self) -> bool:
        """Whether the remote answers; probed once per process, within ``timeout`` seconds."""
        if self._usable is None:
            try:
                _within(self.timeout, self._connect)
                self._usable = True
            except TimeoutError:
                self._disable(f"no answer within {self.timeout:g} s")
            except Exception as exc:  # any failure to reach a remote means: build locally
                self._disable(f"{type(exc).__name__}: {exc}")
        return bool(self._usable)

    def _connect(self) -> None:
        import fsspec

        fs, root = fsspec.core.url_to_fs(self.url, **self.options)
        fs.exists(root)  # one round trip: a dead or silent server shows here, not in the middle of a build
        self._fs, self._root = fs, root.rstrip("/")

    def _disable(self, why: str) -> None:
        self._usable = False
        _warn(f"remote {self.url} is not usable ({why}); building locally")

    # -- pull and push ---------------------------------------------------------------------------

    def pull(self, key: str, store: Store, expected: dict[str, dict] | None = None) -> Entry | None:
        """Download ``key`` into the local store and return it, or None when the remote lacks it.

        ``expected`` (the lock's files for this key) must equal the manifest; every file must match it.
        """
        if not self.usable():
            return None
        try:
            return self._pull(key, store, expected)
        except Exception as exc:
            _warn(f"pulling {key} from {self.url} failed ({type(exc).__name__}: {exc}); building locally")
            return None

    def _pull(self, key: str, store: Store, expected: dict[str, dict] | None) -> Entry | None:
        manifest = self._manifest(key)
        if manifest is None:
            return None
        files = manifest["files"]
        if expected is not None and files != expected:
            raise ValueError(f"its manifest lists other files than artifacts.lock pins for key {key}")
        with store.building() as build_dir:
            for name, want in sorted(files.items()):
                path = build_dir / "artifact" / name
                path.parent.mkdir(parents=True, exist_ok=True)
                self._fs.get_file(self._blob_path(want["xxh3_128"]), str(path))
                if hash_file(path, with_sha256=True).as_dict() != want:
                    raise ValueError(f"{name} does not match the digests in its manifest")
            return store.publish(build_dir, key, manifest)

    def push(self, entry: Entry) -> bool:
        """Upload ``entry``'s blobs, then its manifest. A failure is a warning: the build stays good."""
        if not self.usable():
            return False
        try:
            for name, want in sorted(entry.files.items()):
                blob = self._blob_path(want["xxh3_128"])
                if not self._fs.exists(blob):
                    self._put(entry.artifact / name, blob)
            manifest = entry.directory / "manifest.json"
            self._put(manifest, self._manifest_path(entry.key))
            return True
        except Exception as exc:
            _warn(f"pushing {entry.key} to {self.url} failed ({type(exc).__name__}: {exc}); "
                  "the local build is kept")
            return False

    def has(self, key: str) -> dict | None:
        """The manifest of ``key`` on the remote, or None (also when the remote fails, with a warning)."""
        if not self.usable():
            return None
        try:
            return self._manifest(key)
        except Exception as exc:
            _warn(f"reading {key} on {self.url} failed ({type(exc).__name__}: {exc})")
            return None

    def _manifest(self, key: str) -> dict | None:
        try:
            return json.loads(self._fs.cat_file(self._manifest_path(key)))
        except FileNotFoundError:
            return None

    def _put(self, local: Path, remote: str) -> None:
        """Upload so that ``remote`` appears whole or not at all."""
        self._fs.makedirs(os.path.dirname(remote), exist_ok=True)
        if _protocol(self._fs) in OBJECT_STORES:
            self._fs.put_file(str(local), remote)
            return
        partial = f"{remote}.partial-{uuid.uuid4().hex}"
        try:
            self._fs.put_file(str(local), partial)
            self._fs.mv(partial, remote)
        except BaseException:
            if self._fs.exists(partial):
                self._fs.rm_file(partial)
            raise

    def _blob_path(self, digest: str) -> str:
        return f"{self._root}/blobs/{digest[:2]}/{digest}"

    def _manifest_path(self, key: str) -> str:
        return f"{self._root}/keys/{key[:2]}/{key}.json"


def _warn(message: str) -> None:
    """Tell the person running doit; the build goes on."""
    print(f"phibuild: warning: {message}", file=sys.stderr, flush=True)


def _within(seconds: float, call) -> None:
    """Run ``call`` in a daemon thread and wait at most ``seconds``: a hung connection cannot hold us."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError
    if failure:
        raise failure[0]


def _protocol(fs) -> str:
    protocol = fs.protocol
    return protocol[0] if isinstance(protocol, (tuple, list)) else protocol
