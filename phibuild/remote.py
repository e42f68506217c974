"""A store shared between machines, on any fsspec filesystem: a directory, S3, GCS, Azure, HTTP (read-only).

Layout under the remote's root::

    blobs/ab/<xxh3-128>      file contents, by digest: immutable, so concurrent uploads cannot clash
    keys/ab/<key>.json       the manifest of one store entry: its files' sizes and digests
    keys/ab/<key>.sig        its signature, where the writer signs (signing.py), written before the manifest

Whom to trust is one policy (``Remote._vouched``): with ``trusted_keys``, a signed manifest; without, the lock's pin,
or for an artifact nothing, and then it is marked as vouched for by nobody until ``doit reproduce`` rebuilds it.
A key is published by writing its manifest last, in one atomic step (a rename on filesystems, one PUT on
object stores), after every blob it names: no reader ever sees half an entry. Nothing pulled is trusted:
the manifest is validated as a record (names, digests, key), its files must be the ones ``artifacts.lock``
pins when the lock pins the key, and every file is hashed as it arrives. A pulled entry keeps, in the local
store, the remote it came from, so its smoke result is never mistaken for one that ran here.

Time is bounded three ways: connecting and each read or write (``remote_timeout``, handed to the
filesystem where it takes one), and each whole pull or push (``remote_transfer_timeout``). A remote that
cannot be reached, stalls or fails mid-way is reported once, and given up on for the rest of the run: the
build goes on locally. Credentials come from the filesystem's usual environment (``AWS_*``,
``GOOGLE_APPLICATION_CREDENTIALS``, ``AZURE_STORAGE_*``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import xxhash

from . import reading, validate
from .errors import DamageError
from .hashing import CHUNK, FileDigest
from .records import Manifest
from .signing import PublicKey, SecretKey, signer
from .store import Entry, Store

log = logging.getLogger(__name__)
T = TypeVar("T")

# Protocols whose single PUT is atomic: a blob or manifest is written in place, not renamed.
OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"}
LOCALLY = "building locally, without the remote, for the rest of this run"
PROBE = "phibuild-remote.json"  # read once to see that the remote answers; its absence is an answer too


class NoRemote:
    """The remote of a project that has none: nothing is pulled, pushed or found."""

    url: str | None = None
    failure: str | None = None

    @property
    def caches(self) -> str:
        """Where a key can be found without building it, for messages."""
        return "the store (no remote is set)"

    def pull(self, key: str, expected: dict[str, FileDigest] | None, store: Store) -> Entry | None:
        return None

    def push(self, entry: Entry) -> None:
        pass

    def manifest(self, key: str) -> Manifest | None:
        return None


class Cancelled(Exception):
    """A transfer past its deadline, stopped between two chunks."""


class Remote(NoRemote):
    def __init__(self, url: str, options: dict[str, Any] | None = None, timeout: float = 10.0,
                 transfer_timeout: float = 1800.0, trusted: list[PublicKey] | None = None,
                 signer: SecretKey | None = None):
        self.address = url  # what fsspec connects to; ``url`` is what is shown and recorded
        self.url = shown(url)
        self.options = dict(options or {})
        self.timeout = timeout
        self.transfer_timeout = transfer_timeout
        self.trusted = list(trusted or [])  # with keys listed, only entries signed by one of them are pulled
        self.signer = signer  # this machine's key, signing what it pushes
        self._fs = None
        self._root = ""
        self._checked = False

    @property
    def caches(self) -> str:
        return f"the store or the remote {self.url}"

    # -- reachability ----------------------------------------------------------------------------

    def usable(self) -> bool:
        """Whether the remote answers; probed once per process, within ``timeout`` seconds."""
        if not self._checked:
            self._checked = True
            self._attempt("is not usable", self._connect, self.timeout, LOCALLY)
        return self.failure is None

    def _connect(self, deadline: float) -> None:
        import fsspec

        fs, root = fsspec.core.url_to_fs(self.address, **_bounded_options(self.address, self.options, self.timeout))
        with contextlib.suppress(FileNotFoundError):  # an empty remote answers too
            fs.cat_file(f"{root.rstrip('/')}/{PROBE}")
        self._fs, self._root = fs, root.rstrip("/")

    def _attempt(self, what: str, call: Callable[[float], T], seconds: float, then: str) -> T | None:
        """``call(deadline)`` within ``seconds``; any failure but damage gives the remote up for the rest of
        the run, said once, with what happens ``then``."""
        try:
            return _within(seconds, call)
        except DamageError:
            raise
        except Exception as exc:  # any failure to reach or use a remote means: build locally
            why = f"no answer within {seconds:g} s" if isinstance(exc, TimeoutError | Cancelled) else (
                f"{type(exc).__name__}: {exc}")
            self.failure = why
            log.warning("remote %s %s (%s); %s", self.url, what, why, then)
            return None

    # -- pull and push ---------------------------------------------------------------------------

    def manifest(self, key: str) -> Manifest | None:
        """The manifest of ``key`` on the remote, validated, or None (also when the remote fails)."""
        if not self.usable():
            return None
        try:
            return self._attempt(f"failed reading key {key}", lambda deadline: self._manifest(key), self.timeout,
                                 "going on without it")
        except DamageError as exc:
            log.warning("remote %s: %s", self.url, exc)
            return None

    def pull(self, key: str, expected: dict[str, FileDigest] | None, store: Store) -> Entry | None:
        """Download ``key`` into the local store and return it, or None when the remote lacks it, offers other
        files than ``expected`` (the lock's pin for this key), sends damaged data or fails."""
        if not self.usable():
            return None
        try:
            return self._attempt(f"failed pulling {key}", lambda deadline: self._pull(key, expected, store, deadline),
                                 self.transfer_timeout, LOCALLY)
        except DamageError as exc:
            log.warning("remote entry %s on %s is refused (%s); building locally", key, self.url, exc)
            return None

    def _pull(self, key: str, expected: dict[str, FileDigest] | None, store: Store, deadline: float) -> Entry | None:
        manifest = self._manifest(key)
        if manifest is None:
            return None
        if expected is not None and manifest.files != expected:
            raise DamageError(f"its manifest lists other files than artifacts.lock pins for key {key}")
        trusted_by = self._vouched(key, manifest, expected)
        with store.building() as build_dir:
            artifact = build_dir / "artifact"
            artifact.mkdir()
            for name, want in sorted(manifest.files.items()):
                path = validate.inside(artifact, name)
                path.parent.mkdir(parents=True, exist_ok=True)
                got = self._download(self._blob_path(want.xxh3_128), path, want.size, deadline)
                if got != want:
                    raise DamageError(f"{name} does not match the digests in its manifest")
            return store.publish(build_dir, manifest.pulled(self.url, trusted_by))

    def _vouched(self, key: str, manifest: Manifest, expected: dict[str, FileDigest] | None) -> str | None:
        """Why the entry may be pulled (None: it may, but in the store it is marked as vouched for by nobody), or
        DamageError when it may not. The provenance policy: with ``trusted_keys`` listed, only a manifest signed by
        one of them; without, one the lock pins (the lock's entry is what vouches for it), or an artifact, marked
        (release and publish refuse it until ``doit reproduce`` rebuilds it here); never an unpinned, unsigned
        intermediate, reference or measurement, whose bytes no later check would catch."""
        if self.trusted:
            try:
                record = self._small(self._signature_path(key), "key")
            except FileNotFoundError:
                record = b""
            name = signer(self.trusted, manifest.to_dict(), record)
            if name is None:
                raise DamageError("it is not signed by a key in trusted_keys")
            return f"signed by {name}"
        if expected is not None:
            return None  # the lock's entry vouches for it, where it stands; the store's copy vouches for nothing
        if not manifest.is_artifact:
            raise DamageError(f"{manifest.label} is not pinned by artifacts.lock and not signed; an intermediate, "
                              "a fidelity reference or a measurement is pulled only when pinned or signed by a "
                              "trusted key")
        return None

    def push(self, entry: Entry) -> None:
        """Upload ``entry``'s blobs, then its manifest. A failure is a warning: the build stays good."""
        if self.usable():
            self._attempt(f"failed pushing {entry.key}", lambda deadline: self._push(entry, deadline),
                          self.transfer_timeout, "the local build is kept, and the remote is not used for the rest of "
                          "this run")

    def _push(self, entry: Entry, deadline: float) -> None:
        for name, want in sorted(entry.files.items()):
            blob = self._blob_path(want.xxh3_128)
            if not self._fs.exists(blob):
                self._put(entry.artifact / name, blob, deadline)
        if self.signer is not None:  # before the manifest, which publishes the entry
            self._put(self.signer.sign(entry.manifest.to_dict()), self._signature_path(entry.key), deadline)
        manifest = entry.directory / "manifest.json"
        self._put(manifest, self._manifest_path(entry.key), deadline)

    def _small(self, path: str, kind: str) -> bytes:
        """A manifest or signature, read to at most its kind's limit (``reading.LIMITS``): a remote that answers
        with gigabytes is damage, not a memory problem."""
        limit = reading.LIMITS[kind]
        with self._open(path, 0) as source:
            data = reading.read_at_most(source, limit + 1)
        if len(data) > limit:
            raise DamageError(f"{path} is larger than a {kind} can be")
        return data

    def _open(self, path: str, block_size: int):
        """``path`` on the remote, open for reading. A plain GET over HTTP (servers need not do ranges); on a local
        directory, only a regular file (``reading.open_regular``): a FIFO planted there cannot hang a pull."""
        protocol = _protocol(self._fs)
        if protocol in ("file", "local"):
            try:
                return os.fdopen(reading.open_regular(path), "rb")
            except OSError as exc:
                if isinstance(exc, FileNotFoundError):
                    raise
                raise DamageError(f"{path} is not a regular file") from None
        if protocol in ("http", "https"):
            return self._fs.open(path, "rb", block_size=0)
        return self._fs.open(path, "rb", block_size=block_size or CHUNK)

    def _manifest(self, key: str) -> Manifest | None:
        path = self._manifest_path(key)
        try:
            data = reading.json_data(self._small(path, "manifest"), "its manifest")
        except FileNotFoundError:
            return None
        except reading.Unreadable as exc:
            raise DamageError(str(exc)) from None
        try:
            manifest = Manifest.from_dict(data, "its manifest")
        except validate.Invalid as exc:
            raise DamageError(str(exc)) from None
        if manifest.key != key:
            raise DamageError(f"its manifest describes key {manifest.key}")
        return manifest

    def _download(self, blob: str, path: Path, announced: int, deadline: float) -> FileDigest:
        """Copy one blob to ``path`` a chunk at a time, hashing it on the way, stopping at ``deadline``, and
        stopping as soon as it runs past the size its manifest ``announced``."""
        xxh, sha, size = xxhash.xxh3_128(), hashlib.sha256(), 0
        with self._open(blob, CHUNK) as source, open(path, "xb") as target:
            while chunk := source.read(min(CHUNK, announced - size + 1)):
                if time.monotonic() > deadline:
                    raise Cancelled
                if size + len(chunk) > announced:
                    raise DamageError(f"blob {blob.rsplit('/', 1)[-1]} runs past the {announced} bytes its manifest "
                                      "announces; stopped there")
                target.write(chunk)
                xxh.update(chunk)
                sha.update(chunk)
                size += len(chunk)
        return FileDigest(size, xxh.hexdigest(), sha.hexdigest())

    def _put(self, local: Path | bytes, remote: str, deadline: float) -> None:
        """Upload a file (or bytes) so that ``remote`` appears whole or not at all."""
        if time.monotonic() > deadline:
            raise Cancelled
        self._fs.makedirs(os.path.dirname(remote), exist_ok=True)

        def upload(path: str) -> None:
            if isinstance(local, bytes):
                self._fs.pipe_file(path, local)
            else:
                self._fs.put_file(str(local), path)

        if _protocol(self._fs) in OBJECT_STORES:
            upload(remote)
            return
        partial = f"{remote}.partial-{uuid.uuid4().hex}"
        try:
            upload(partial)
            self._fs.mv(partial, remote)
        except BaseException:
            with contextlib.suppress(Exception):
                if self._fs.exists(partial):
                    self._fs.rm_file(partial)
            raise

    def _blob_path(self, digest: str) -> str:
        return f"{self._root}/blobs/{digest[:2]}/{validate.key(digest, 'a blob digest')}"

    def _manifest_path(self, key: str) -> str:
        return f"{self._root}/keys/{key[:2]}/{validate.key(key, 'a cache key')}.json"

    def _signature_path(self, key: str) -> str:
        return f"{self._root}/keys/{key[:2]}/{validate.key(key, 'a cache key')}.sig"


def shown(url: str) -> str:
    """``url`` without what must not be printed or written into a lock, in every part of an fsspec chain
    (``simplecache::http://...``): user names and passwords, query strings (a signed URL's token), fragments,
    parameters."""
    url = re.sub(r"//[^/?#]*@", "//", url)  # user info, up to the last "@" before the path
    url = re.sub(r"[?#].*?(?=::|$)", "", url)  # a query or fragment, to the end of its part of the chain
    return re.sub(r";[^/:?#]*", "", url)  # parameters


def _bounded_options(url: str, options: dict[str, Any], timeout: float) -> dict[str, Any]:
    """The user's fsspec options, with time limits on connecting and on each read added for the protocols
    that take them (the user's own settings win)."""
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    options = dict(options)
    if protocol in ("http", "https"):
        import aiohttp

        client = dict(options.get("client_kwargs", {}))
        client.setdefault("timeout", aiohttp.ClientTimeout(total=None, connect=timeout, sock_connect=timeout,
                                                           sock_read=timeout))
        options["client_kwargs"] = client
    elif protocol in ("s3", "s3a"):
        config = dict(options.get("config_kwargs", {}))
        config.setdefault("connect_timeout", timeout)
        config.setdefault("read_timeout", timeout)
        config.setdefault("retries", {"max_attempts": 2})
        options["config_kwargs"] = config
    return options


def _within(seconds: float, call: Callable[[float], T]) -> T:
    """``call(deadline)`` in a daemon thread, waited for at most ``seconds``: a hung connection cannot hold
    the build. ``call`` checks the deadline between chunks; one stuck inside a read is abandoned."""
    deadline = time.monotonic() + seconds
    outcome: list = []

    def run() -> None:
        try:
            outcome.append((True, call(deadline)))
        except BaseException as exc:
            outcome.append((False, exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if not outcome:
        raise TimeoutError
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def _protocol(fs) -> str:
    protocol = fs.protocol
    return protocol[0] if isinstance(protocol, tuple | list) else protocol
