"""A fake Hugging Face hub on loopback, serving model repos the way huggingface_hub 1.x fetches them.

Only the routes that ``HfApi.model_info`` / ``repo_info`` and ``hf_hub_download`` (so ``snapshot_download``)
call::

    GET        /api/models/{owner}/{name}[/revision/{rev}][?blobs=True]   model info JSON
    HEAD, GET  /{owner}/{name}/resolve/{rev}/{path}                      one file; Range is honoured

and those that ``create_repo`` and ``create_commit`` call, with LFS's basic transfer (the client is told to
upload over plain HTTP: set ``HF_HUB_DISABLE_XET``)::

    POST       /api/repos/create                                          a new repo, one empty commit
    POST       /api/validate-yaml                                         a README's front matter, checked
    POST       /api/models/{owner}/{name}/preupload/{rev}                 regular or LFS, per file
    POST       /{owner}/{name}.git/info/lfs/objects/batch                 where to PUT each new LFS object
    PUT        /lfs/{oid}                                                  one LFS object, checked by sha256
    POST       /api/models/{owner}/{name}/commit/{rev}                    one commit (ndjson), atomically

A branch names a 40-hex commit and each commit holds a whole tree, so a branch can move while old commits
stay downloadable. LFS files (weights, tokenizer.model) carry their sha256 in ``X-Linked-Etag`` and in the
``?blobs=True`` metadata, as on the real hub. No ``X-Xet-*`` header is ever sent, so the client downloads
over plain HTTP. Every request is logged; two faults can be injected: drop the connection part-way through
a file once, or serve a file corrupted while its metadata still gives the original sha256.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.model", "*.onnx", "*.gguf")
RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


@dataclass(frozen=True)
class Request:
    """One request as the hub saw it."""

    method: str
    path: str
    repo: str | None
    revision: str | None  # as asked for: a branch or a commit
    filename: str | None  # for /resolve/ requests
    range_start: int | None  # from the Range header
    status: int
    sent: int  # body bytes written


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def card_errors(readme: str) -> list[str]:
    """What the hub would refuse in a README's YAML front matter (the fields phibuild writes, typed as the hub's
    schema types them)."""
    import yaml

    if not readme.startswith("---\n"):
        return []
    try:
        data = yaml.safe_load(readme[4:].split("\n---", 1)[0])
    except yaml.YAMLError as exc:
        return [f"not YAML: {exc}"]
    if not isinstance(data, dict):
        return ["the metadata must be a mapping"]
    strings = ("license", "library_name", "pipeline_tag", "base_model", "base_model_relation")
    errors = [f"{key} must be a string" for key in strings if key in data and not isinstance(data[key], str)]
    if "tags" in data and not (isinstance(data["tags"], list) and all(isinstance(t, str) for t in data["tags"])):
        errors.append("tags must be a list of strings")
    return errors


def is_lfs(filename: str) -> bool:
    return any(fnmatch.fnmatch(filename.rsplit("/", 1)[-1], pattern) for pattern in LFS_PATTERNS)


class FakeHub:
    """Start with ``with FakeHub() as hub:``; ``hub.url`` is the endpoint to give HF_ENDPOINT."""

    def __init__(self) -> None:
        self.commits: dict[str, dict[str, dict[str, bytes]]] = {}  # repo -> commit -> {path: bytes}
        self.branches: dict[str, dict[str, str]] = {}  # repo -> branch -> commit
        self.log: list[Request] = []
        self.cards: dict[str, dict] = {}  # repo -> card data (license, ...) that model_info reports
        self.private: dict[str, bool] = {}
        self.lfs: dict[str, bytes] = {}  # sha256 -> content, uploaded before a commit names it
        self.refuse_uploads = False  # a fault: every LFS upload gets a 503
        self._drops: dict[tuple[str, str], int] = {}
        self._corrupted: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (_Handler,), {"hub": self}))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- repos and faults ------------------------------------------------------------------------

    def push(self, repo: str, files: dict[str, bytes], branch: str = "main") -> str:
        """Commit ``files`` as the whole tree of ``branch`` (created or moved) and return the commit."""
        parent = self.branches.get(repo, {}).get(branch, "")
        tree = sorted((name, hashlib.sha256(data).hexdigest()) for name, data in files.items())
        commit = hashlib.sha1(json.dumps([parent, tree]).encode()).hexdigest()
        self.commits.setdefault(repo, {})[commit] = dict(files)
        self.branches.setdefault(repo, {})[branch] = commit
        return commit

    def commit_count(self, repo: str) -> int:
        return len(self.commits.get(repo, {}))

    def files(self, repo: str, revision: str = "main") -> dict[str, bytes]:
        return dict(self.commits[repo][self._commit(repo, revision)])

    def drop_after(self, repo: str, filename: str, nbytes: int) -> None:
        """The next GET of ``filename`` sends ``nbytes`` of its body, then the connection is closed."""
        self._drops[repo, filename] = nbytes

    def corrupt(self, repo: str, filename: str) -> None:
        """Serve ``filename`` with one byte flipped from now on; its metadata keeps the true sha256."""
        self._corrupted.add((repo, filename))

    def repair(self, repo: str, filename: str) -> None:
        """Serve ``filename`` intact again."""
        self._corrupted.discard((repo, filename))

    # -- what was served -------------------------------------------------------------------------

    def downloads(self, filename: str | None = None) -> list[Request]:
        """GETs of files (of ``filename`` if given), in order."""
        return [r for r in self.log if r.method == "GET" and r.filename and filename in (None, r.filename)]

    def bytes_served(self, filename: str) -> int:
        return sum(r.sent for r in self.downloads(filename))

    def clear_log(self) -> None:
        with self._lock:
            self.log.clear()

    # -- used by the handler ---------------------------------------------------------------------

    def _commit(self, repo: str, revision: str) -> str | None:
        if revision in self.commits.get(repo, {}):
            return revision
        return self.branches.get(repo, {}).get(revision)

    def _body(self, repo: str, filename: str, data: bytes) -> bytes:
        if (repo, filename) not in self._corrupted:
            return data
        middle = len(data) // 2
        return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]

    def _take_drop(self, repo: str, filename: str) -> int | None:
        with self._lock:
            return self._drops.pop((repo, filename), None)

    def _record(self, request: Request) -> None:
        with self._lock:
            self.log.append(request)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the real hub; every response has a Content-Length
    hub: FakeHub

    def do_GET(self) -> None:
        self._route(send_body=True)

    def do_HEAD(self) -> None:
        self._route(send_body=False)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        parts = [unquote(p) for p in urlsplit(self.path).path.split("/")[1:]]
        if parts == ["api", "repos", "create"]:
            self._create(json.loads(body))
        elif parts == ["api", "validate-yaml"]:
            errors = card_errors(json.loads(body)["content"])
            self._json(400 if errors else 200, {"errors": [{"message": e} for e in errors], "warnings": []})
        elif parts[:2] == ["api", "models"] and len(parts) == 6 and parts[4] == "preupload":
            files = [{"path": f["path"], "uploadMode": "lfs" if is_lfs(f["path"]) else "regular",
                      "shouldIgnore": False} for f in json.loads(body)["files"]]
            self._json(200, {"files": files})
        elif len(parts) == 6 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "batch"]:
            objects = [{"oid": o["oid"], "size": o["size"], "authenticated": True,
                        **({} if o["oid"] in self.hub.lfs else
                           {"actions": {"upload": {"href": f"{self.hub.url}/lfs/{o['oid']}"}}})}
                       for o in json.loads(body)["objects"]]
            self._json(200, {"transfer": "basic", "objects": objects})
        elif parts[:2] == ["api", "models"] and len(parts) == 6 and parts[4] == "commit":
            self._commit_ndjson("/".join(parts[2:4]), parts[5], body)
        else:
            self._error(404, "NotFound", None, None, None)

    def do_PUT(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        parts = urlsplit(self.path).path.split("/")[1:]
        if self.hub.refuse_uploads:
            self._error(503, "ServiceUnavailable", None, None, None)
        elif len(parts) == 2 and parts[0] == "lfs" and hashlib.sha256(body).hexdigest() == parts[1]:
            self.hub.lfs[parts[1]] = body
            self._json(200, {})
        else:
            self._error(400, "BadUpload", None, None, None)

    def _create(self, request: dict) -> None:
        repo = f"{request['organization']}/{request['name']}"
        if repo in self.hub.commits:
            return self._json(409, {"error": "You already created this model repo", "url": f"{self.hub.url}/{repo}"})
        self.hub.push(repo, {".gitattributes": b"*.gguf filter=lfs diff=lfs merge=lfs -text\n"})
        visibility = request.get("visibility", "private" if request.get("private") else "public")
        self.hub.private[repo] = visibility == "private"
        self._json(200, {"url": f"{self.hub.url}/{repo}", "name": repo})

    def _commit_ndjson(self, repo: str, revision: str, body: bytes) -> None:
        """Apply a commit whole or not at all: every LFS file it names must have been uploaded."""
        if repo not in self.hub.commits:
            return self._error(404, "RepoNotFound", repo, revision, None)
        tree = self.hub.files(repo, revision)
        for line in body.splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "file":
                tree[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "lfsFile":
                if value["oid"] not in self.hub.lfs:
                    return self._error(400, "LfsObjectMissing", repo, revision, value["path"])
                tree[value["path"]] = self.hub.lfs[value["oid"]]
            elif item["key"] == "deletedFile":
                tree.pop(value["path"], None)
        commit = self.hub.push(repo, tree, revision)
        self._json(200, {"commitUrl": f"{self.hub.url}/{repo}/commit/{commit}", "commitOid": commit,
                         "success": True})

    def _json(self, status: int, data: dict) -> None:
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self._log(status, None, None, None, None, len(body))

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: FakeHub.log holds every request."""

    def _route(self, send_body: bool) -> None:
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        if parts[:2] == ["api", "models"] and len(parts) in (4, 6) and send_body:
            revision = parts[5] if len(parts) == 6 and parts[4] == "revision" else "main"
            blobs = parse_qs(url.query).get("blobs", [""])[0].lower() == "true"
            self._model_info("/".join(parts[2:4]), revision, blobs)
        elif len(parts) >= 5 and parts[2] == "resolve":
            self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]), send_body)
        else:
            self._error(404, "NotFound", None, None, None)

    def _model_info(self, repo: str, revision: str, blobs: bool) -> None:
        if repo not in self.hub.commits:
            return self._error(404, "RepoNotFound", repo, revision, None)
        commit = self.hub._commit(repo, revision)
        if commit is None:
            return self._error(404, "RevisionNotFound", repo, revision, None)
        siblings = []
        for name, data in sorted(self.hub.commits[repo][commit].items()):
            sibling: dict = {"rfilename": name}
            if blobs:
                sibling.update(blobId=git_blob_sha1(data), size=len(data))
                if is_lfs(name):
                    pointer = (f"version https://git-lfs.github.com/spec/v1\n"
                               f"oid sha256:{hashlib.sha256(data).hexdigest()}\nsize {len(data)}\n").encode()
                    sibling.update(blobId=git_blob_sha1(pointer),
                                   lfs={"sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
                                        "pointerSize": len(pointer)})
            siblings.append(sibling)
        info = {"_id": commit[:24], "id": repo, "modelId": repo, "sha": commit, "private": False,
                "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": [],
                "lastModified": "2026-01-01T00:00:00.000Z", "siblings": siblings,
                **({"cardData": self.hub.cards[repo]} if repo in self.hub.cards else {})}
        body = json.dumps(info).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self._log(200, repo, revision, None, None, len(body))

    def _resolve(self, repo: str, revision: str, filename: str, send_body: bool) -> None:
        if repo not in self.hub.commits:
            return self._error(404, "RepoNotFound", repo, revision, filename)
        commit = self.hub._commit(repo, revision)
        if commit is None:
            return self._error(404, "RevisionNotFound", repo, revision, filename)
        data = self.hub.commits[repo][commit].get(filename)
        if data is None:
            return self._error(404, "EntryNotFound", repo, revision, filename, commit)
        start, end, status = 0, len(data) - 1, 200
        match = RANGE.match(self.headers.get("Range", ""))
        if match:
            start, end, status = int(match[1]), int(match[2] or end), 206
            if start >= len(data) or end < start:
                return self._error(416, "RangeNotSatisfiable", repo, revision, filename, commit)
            end = min(end, len(data) - 1)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end + 1 - start))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("X-Repo-Commit", commit)
        if is_lfs(filename):
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("X-Linked-Etag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("X-Linked-Size", str(len(data)))
        else:
            self.send_header("ETag", f'"{git_blob_sha1(data)}"')
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.end_headers()
        body = self.hub._body(repo, filename, data)[start:end + 1] if send_body else b""
        drop = self.hub._take_drop(repo, filename) if send_body else None
        if drop is not None:
            body = body[:drop]
            self.close_connection = True  # the client sees the body end early, as on a network failure
        self.wfile.write(body)
        self.wfile.flush()
        self._log(status, repo, revision, filename, start if match else None, len(body))

    def _error(self, status: int, code: str, repo: str | None, revision: str | None, filename: str | None,
               commit: str | None = None) -> None:
        body = json.dumps({"error": f"{code}: {self.path}"}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Error-Code", code)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.end_headers()
        if self.command == "HEAD":
            body = b""
        self.wfile.write(body)
        self._log(status, repo, revision, filename, None, len(body))

    def _log(self, status: int, repo: str | None, revision: str | None, filename: str | None,
             range_start: int | None, sent: int) -> None:
        self.hub._record(Request(self.command, urlsplit(self.path).path, repo, revision, filename,
                                 range_start, status, sent))
