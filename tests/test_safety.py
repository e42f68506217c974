"""Safety, class by class: each test stands for a class of hostile or careless input and is parametrized over its
members, so that the mechanism is what is tested (one path policy, one bounded reader, one record validator, one
provenance policy), not an example. Every case is refused in one line, or built locally; none destroys a user's
file, hangs, exhausts memory, ships an artifact nobody vouched for, or writes a lock phibuild cannot read back.

Cases that need a built project start from conftest's ``world`` (phi3-tiny at int4 through ONNX and GGUF, pushed
to a remote directory beside it), copied afresh for each test.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import threading
from dataclasses import replace
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import REPO, copy_model, run_doit, write_project
from conftest import world_project as project

from phibuild import reading, signing, sources
from phibuild.errors import BuildError, DamageError, LockError, SourceError
from phibuild.lockfile import Lockfile, parse
from phibuild.records import MEASUREMENT
from phibuild.remote import Remote

ONNX, GGUF = "a-int4-onnx", "a-int4-gguf"
DEEP = 5000  # far past Python's recursion limit


def one_line(run) -> None:
    assert run.code != 0, run.output
    assert "Traceback" not in run.output, run.output


def tree(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` and its bytes (what must survive a refused command)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and not p.is_symlink() and ".doit.db" not in p.name}


def user_project(tmp_path: Path, settings: str) -> Path:
    """A project of the user's own beside phibuild's settings: source files, a .git, a docs directory."""
    root = write_project(tmp_path / "p", ["phi3-tiny"], ["onnx"], ["int4"], extra=settings)
    for name, text in {"src/app.py": "print('mine')\n", ".git/HEAD": "ref: refs/heads/main\n",
                       "docs/guide.md": "# mine\n", "notes.txt": "mine\n"}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


# -- 1. paths from settings: one policy ------------------------------------------------------------------------


@pytest.mark.parametrize(("settings", "message"), [
    ('release_dir = "."', "is the project"),
    ('report_dir = "."', "is the project"),
    ('build = "."', "is the project"),
    ('store = "."', "is the project"),
    ('release_dir = "sub/../"', "is the project"),
    ('store = ".."', "or holds it"),
    ('release_dir = ".."', "or holds it"),
    ('report_dir = "/"', "or holds it"),
    ('release_dir = ".phibuild"', "overlap"),
    ('report_dir = "build/report"', "overlap"),
    ('build = "release"\nrelease_dir = "release"', "overlap"),
    ('lock = ".phibuild/artifacts.lock"', "overlap"),
    ('lock = "build/x.lock"', "overlap"),
    ('release_dir = "../elsewhere"', "without '..'"),
    ('build = "/tmp/phibuild-build"', "lies outside the project"),
    ('release_dir = "pyproject.toml"', "is a file"),
    ('lock = "src"', "must name a file ending in .lock"),
    ('remote = "."', "is the project or holds it"),
    ('remote = ".phibuild/remote"', "overlap"),
    ('remote = "file://{root}"', "is the project or holds it"),
    ('remote = "local://{root}"', "is the project or holds it"),
    ('remote = "simplecache::file://{root}/.phibuild"', "overlap"),
    ('trusted_keys = ["ci:' + "A" * 43 + '=", "ci:' + "B" * 43 + '="]', "more than once"),
    ("remote_timeout = 1e308", "at most 604800"),
    ('remote = "file://{root}/.phibuild/objects"', "overlap"),
    ('lock = "src/app.py"', "must name a file ending in .lock"),
    ('lock = "pyproject.toml"', "must name a file ending in .lock"),
    ('build = "src/../other"', "without '..'"),
    ('eval_text = "/proc/self/environ"', "lies outside the project"),
    ('eval_text = "../secrets.txt"', "lies outside the project"),
    ('release_dir = "out"\n[tool.phibuild.model.mine]\npath = "out/model"', "lies in phibuild's release_dir"),
    ('[tool.phibuild.model.mine]\npath = ".phibuild/model"', "lies in phibuild's store"),
    ('[tool.phibuild.gates.int4]\ntop1 = 85', "must be a share from 0 to 1"),
    ("eval_length = 64", "must be at least 128 tokens"),
])
def test_a_setting_that_names_the_project_or_another_place_of_phibuilds_is_refused_at_load(tmp_path, settings,
                                                                                            message):
    root = user_project(tmp_path, settings.replace("{root}", str(tmp_path / "p")) + "\n")
    before = tree(root)
    for command in ("list", "release", "report", "gc"):
        run = run_doit(root, command)
        one_line(run)
        assert message in run.output, run.output
    assert tree(root) == before  # nothing written, nothing removed


@pytest.mark.parametrize(("setting", "value", "message"), [
    ("release_dir", "out", "leads through a symlink"),
    ("release_dir", "link/out", "leads through a symlink"),
    ("build", "link/..", "without '..'"),  # the link's target's parent, outside the project
    ("report_dir", "link/../report", "without '..'"),
    ("lock", "link/x.lock", "leads through a symlink"),
])
def test_a_setting_that_leads_through_a_symlink_is_refused(tmp_path, setting, value, message):
    outside = tmp_path / "outside" / "inner"
    outside.mkdir(parents=True)
    root = user_project(tmp_path, f"{setting} = {json.dumps(value)}\n")
    (root / "out").symlink_to(root / "src")
    (root / "link").symlink_to(outside)
    for command in ("release", "report", "quantize:phi3-tiny-int4-onnx"):
        run = run_doit(root, command)
        one_line(run)
        assert message in run.output, run.output
    assert (root / "src" / "app.py").read_text() == "print('mine')\n"
    assert list((tmp_path / "outside").rglob("*")) == [outside]


@pytest.mark.parametrize(("setting", "command", "files"), [
    ("release_dir", "release", {"guide.md": "# mine\n"}),
    ("report_dir", "report", {"guide.md": "# mine\n"}),
    ("report_dir", "report", {"REPORT.md": "# Q3 findings\n", "fig1.png": "png"}),  # looks like a report
    ("release_dir", "release", {"mypkg-1.0.tar.gz": "tar", "SHA256SUMS": "0" * 64 + "  mypkg-1.0.tar.gz\n"}),
    ("release_dir", "release", {"a/x.bin": "x", "SHA256SUMS": "0" * 64 + "  a/x.bin\n"}),  # no card: no bundle
])
def test_a_directory_phibuild_did_not_make_is_never_replaced(world, setting, command, files):
    one = world / "one"
    for name, text in files.items():
        (one / "docs" / name).parent.mkdir(parents=True, exist_ok=True)
        (one / "docs" / name).write_text(text)
    (one / "pyproject.toml").write_text((one / "pyproject.toml").read_text().replace(
        "[tool.phibuild]\n", f'[tool.phibuild]\n{setting} = "docs"\n'))
    run = run_doit(one, command)
    one_line(run)
    assert "was not made by phibuild" in run.output
    assert all((one / "docs" / name).read_text() == text for name, text in files.items())


@pytest.mark.parametrize("added", ["NOTES.md", "sub/notes.md", "empty/", "link"])
def test_a_directory_phibuild_made_is_replaced_only_while_it_holds_nothing_else(world, added):
    one = world / "one"
    for _ in range(2):  # a release replaces the one before it
        assert run_doit(one, "release").code == 0
    released = one / "release"
    target = released / added.rstrip("/")
    target.parent.mkdir(exist_ok=True)
    if added == "link":
        target.symlink_to(world / "model")
    elif added.endswith("/"):
        target.mkdir()
    else:
        target.write_text("mine\n")
    run = run_doit(one, "release")
    one_line(run)
    assert "was not made by phibuild" in run.output and added.split("/")[0] in run.output
    assert target.exists() and (world / "model" / "config.json").is_file()


@pytest.mark.parametrize("where", ["fresh", "built"])
def test_a_users_file_in_a_shown_artifact_is_not_thrown_away(world, where):
    one = world / "one"
    if where == "fresh":
        shutil.rmtree(one / "build" / ONNX)
        (one / "build" / ONNX).mkdir()
    else:  # beside the artifact's own files
        shutil.rmtree(one / ".phibuild" / "objects")  # so that it is restored and shown again
    (one / "build" / ONNX / "my-notes.txt").write_text("mine\n")
    run = run_doit(one, f"quantize:{ONNX}")
    one_line(run)
    assert "my-notes.txt" in run.output
    assert (one / "build" / ONNX / "my-notes.txt").read_text() == "mine\n"


def test_doit_clean_removes_only_what_phibuild_showed(world):
    one = world / "one"
    (one / "build" / ONNX / "my-notes.txt").write_text("mine\n")
    run = run_doit(one, "clean", f"quantize:{ONNX}")
    assert "my-notes.txt" in run.output, run.output
    assert (one / "build" / ONNX / "my-notes.txt").read_text() == "mine\n"
    assert run_doit(one, "clean", f"quantize:{GGUF}").code == 0
    assert not (one / "build" / GGUF).exists()


@pytest.mark.parametrize("layout", [["guide.md"], ["tmp/4194303-thesis/ch1.tex", "objects/ab/" + "a" * 32 + "/n"]])
def test_a_store_setting_naming_a_users_directory_is_refused(tmp_path, layout):
    root = user_project(tmp_path, 'store = "data"\n')
    for name in layout:
        (root / "data" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "data" / name).write_text("mine\n")
    for command in ("list", "gc --delete", "quantize:phi3-tiny-int4-onnx"):
        run = run_doit(root, *command.split())
        one_line(run)
        assert "is a directory phibuild did not make" in run.output
    assert all((root / "data" / name).read_text() == "mine\n" for name in layout)


def test_gc_in_a_shared_store_keeps_what_the_other_projects_reference(world):
    shared = world / "shared"
    a = project(world, "a", backends=("gguf",), extra=f'store = "{shared}"\n', remote="")
    b = project(world, "b", backends=("onnx",), extra=f'store = "{shared}"\n', remote="")
    assert run_doit(a).code == 0 and run_doit(b).code == 0
    run = run_doit(a, "gc", "--delete")
    assert run.code == 0, run.output
    again = run_doit(b)
    assert again.code == 0 and again.built == [] and "restored from the store" not in again.output, again.output
    assert run_doit(b, "verify").code == 0


def test_sweeping_takes_only_what_phibuild_staged(world):
    one = world / "one"
    mine = one / ".backup.phibuild-2024-12-07"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine\n")
    dead = one / ".artifacts.lock.phibuild-4194303-0123abcd"  # a dead process's staging file
    dead.write_text("half a lock")
    assert run_doit(one, "list").code == 0
    assert (mine / "notes.txt").read_text() == "mine\n" and not dead.exists()


@pytest.mark.parametrize("where", ["fan-out", "entry", "tmp"])
def test_gc_and_dead_build_cleaning_never_follow_a_symlink_out_of_the_store(world, where):
    one, outside = world / "one", world / "outside"
    outside.mkdir()
    victim = outside / ("0123456789abcdef0123456789abcdef" if where != "tmp" else "4194303-abcd")  # a dead pid
    victim.mkdir()
    (victim / "precious.txt").write_text("mine\n")
    objects = one / ".phibuild" / "objects"
    if where == "fan-out":
        (objects / "01").symlink_to(outside)
    elif where == "entry":
        fan = objects / "01"
        fan.mkdir(exist_ok=True)
        (fan / victim.name).symlink_to(victim)
    else:
        shutil.rmtree(one / ".phibuild" / "tmp", ignore_errors=True)
        (one / ".phibuild" / "tmp").symlink_to(outside)
        key = Lockfile(one / "artifacts.lock").get(ONNX).key
        shutil.rmtree(objects / key[:2] / key)  # so that a build (or a pull) needs the tmp directory
    run = run_doit(one, "gc", "--delete") if where != "tmp" else run_doit(one, f"quantize:{ONNX}")
    if where == "tmp":
        one_line(run)
        assert "lies behind a symlink" in run.output
    else:
        assert run.code == 0, run.output
        assert "not a store entry" in run.output and "left alone" in run.output
    assert (victim / "precious.txt").read_text() == "mine\n"


@pytest.mark.parametrize("field", ["size", "sha256", "xxh3_128"])
def test_a_pin_edited_in_the_lock_never_costs_the_intact_store_entry_or_the_release(world, field):
    one = world / "one"
    assert run_doit(one, "release").code == 0
    released = tree(one / "release")
    lock = Lockfile(one / "artifacts.lock")
    entry = lock.get(ONNX)
    name, digest = sorted(entry.files.items())[0]
    edited = {"size": digest.size + 1, "sha256": "0" * 64, "xxh3_128": "0" * 32}[field]
    lock.put(ONNX, replace(entry, files={**entry.files, name: replace(digest, **{field: edited})}))
    stored = one / ".phibuild" / "objects" / entry.key[:2] / entry.key
    for command in (f"quantize:{ONNX}", "release"):
        run = run_doit(one, command)
        one_line(run)
        assert "the lock was edited" in run.output, run.output
        assert stored.is_dir()  # the intact entry is kept
    assert tree(one / "release") == released  # the good release stands


def test_a_damaged_store_entry_is_dropped_by_release_so_that_its_advice_works(world):
    one = world / "one"
    entry = Lockfile(one / "artifacts.lock").get(ONNX)
    name = sorted(entry.files)[0]
    stored = one / ".phibuild" / "objects" / entry.key[:2] / entry.key / "artifact" / name
    data = bytearray(stored.read_bytes())
    data[-1] ^= 1
    stored.write_bytes(bytes(data))
    run = run_doit(one, "release")
    one_line(run)
    assert f"doit quantize:{ONNX}" in run.output
    again = run_doit(one, f"quantize:{ONNX}")
    assert again.code == 0 and ("pulled from the remote" in again.output or ONNX in again.built), again.output
    assert run_doit(one, "release").code == 0


# -- 2. reads bounded by construction --------------------------------------------------------------------------


def special(path: Path, kind: str) -> None:
    """Make ``path`` a FIFO, a symlink to /dev/zero, or a file larger than any of its kind."""
    path.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "zero":
        path.symlink_to("/dev/zero")
    else:
        with open(path, "wb") as handle:
            handle.truncate(reading.LIMITS["model config"] + 1)  # sparse: costs no disk


def doit_bounded(root: Path, *args: str, seconds: float = 120) -> subprocess.CompletedProcess:
    """``doit`` in its own process, killed if it hangs (an unbounded read of a FIFO would)."""
    return subprocess.run([sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), "-d", str(root), *args],
                          cwd=root, capture_output=True, text=True, timeout=seconds)


@pytest.mark.parametrize(("place", "kind"), [
    *((place, kind) for place in ("lock", "slice", "config.json", "model.safetensors.index.json")
      for kind in ("fifo", "zero", "huge")),
    *((place, kind) for place in ("model.safetensors", "tokenizer.json", "README.md") for kind in ("fifo", "zero")),
])
def test_a_special_or_oversized_file_is_refused_before_it_is_read(tmp_path, place, kind):
    model = copy_model("phi3-tiny", tmp_path / "model")
    root = write_project(tmp_path / "p", ["a"], ["onnx"], ["int4"], local={"a": model})
    path = {"lock": root / "artifacts.lock", "slice": root / "slices" / "one.lock"}.get(place, model / place)
    path.parent.mkdir(exist_ok=True)
    special(path, kind)
    command = ["assemble"] if place == "slice" else ["quantize:a-int4-onnx"]
    done = doit_bounded(root, *command)
    output = done.stdout + done.stderr
    if place == "README.md":  # read only for its license: without one, the build goes on
        assert done.returncode == 0 and "Traceback" not in output, output
        return
    assert done.returncode != 0 and "Traceback" not in output, output
    assert any(said in output for said in ("not a regular file", "larger than", "leads through a symlink")), output


@pytest.mark.parametrize("what", ["blob", "manifest"])
def test_a_fifo_planted_in_a_directory_remote_cannot_hang_a_pull(world, what):
    entry = Lockfile(world / "one" / "artifacts.lock").get(ONNX)
    digest = sorted(entry.files.values(), key=lambda d: d.size)[-1].xxh3_128
    path = (world / "remote" / "blobs" / digest[:2] / digest if what == "blob"
            else world / "remote" / "keys" / entry.key[:2] / f"{entry.key}.json")
    path.unlink()
    os.mkfifo(path)
    two = project(world, "two", backends=("onnx",))
    shutil.copy(world / "one" / "artifacts.lock", two / "artifacts.lock")
    done = doit_bounded(two, f"quantize:{ONNX}", seconds=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "Traceback" not in output, output
    assert "is not a regular file" in output and "building locally" in output


def test_a_model_file_larger_than_its_kind_is_refused_before_it_is_hashed(tmp_path):
    model = copy_model("phi3-tiny", tmp_path / "model")
    with open(model / "tokenizer.model", "wb") as handle:
        handle.truncate(200 * 2**30)  # sparse: 200 GiB that cost no disk, and would take minutes to hash
    root = write_project(tmp_path / "p", ["a"], ["onnx"], ["int4"], local={"a": model})
    run = run_doit(root, "quantize:a-int4-onnx")
    one_line(run)
    assert "tokenizer.model is larger than a model's tokenizer.model can be" in run.output
    assert run.bytes_read < 2**30


def test_weights_whose_header_does_not_describe_them_are_refused_before_they_are_hashed(tmp_path):
    model = copy_model("phi3-tiny", tmp_path / "model")
    with open(model / "model.safetensors", "r+b") as handle:
        handle.truncate(2 * 2**40)  # sparse: 2 TiB that cost no disk
    root = write_project(tmp_path / "p", ["a"], ["onnx"], ["int4"], local={"a": model})
    run = run_doit(root, "quantize:a-int4-onnx")
    one_line(run)
    assert "is truncated or padded" in run.output and run.bytes_read < 2**30


def test_a_path_that_is_no_model_is_refused_before_anything_is_hashed(tmp_path):
    root = write_project(tmp_path / "p", ["a"], ["onnx"], ["int4"], local={"a": Path("/")})
    run = run_doit(root, "quantize:a-int4-onnx")
    one_line(run)
    assert "it has no config.json" in run.output
    assert run.bytes_read == 0


class _Padded(SimpleHTTPRequestHandler):
    """Serves a remote directory, each blob followed by a flood of bytes its manifest does not announce."""

    def do_GET(self) -> None:
        if "/blobs/" not in self.path:
            return super().do_GET()
        data = (Path(self.directory) / self.path.lstrip("/")).read_bytes()
        self.send_response(200)
        self.end_headers()
        self.wfile.write(data)
        for _ in range(64):  # 64 MiB past the announced size, if nobody stops reading
            self.wfile.write(b"\0" * (1 << 20))

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize("remote", ["directory", "http"])
def test_a_remote_that_sends_more_than_it_announced_is_stopped_there(world, remote):
    blobs = sorted((world / "remote" / "blobs").rglob("*"))
    server = None
    if remote == "directory":
        for blob in (b for b in blobs if b.is_file()):
            blob.chmod(0o644)
            with open(blob, "ab") as handle:
                handle.write(b"\0" * (4 << 20))
        url = "../remote"
    else:
        handler = functools.partial(_Padded, directory=str(world / "remote"))
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        two = project(world, "two", remote=url, backends=("onnx",))
        shutil.copy(world / "one" / "artifacts.lock", two / "artifacts.lock")
        run = run_doit(two)
    finally:
        if server:
            server.shutdown()
            server.server_close()
    assert run.code == 0 and run.built == [ONNX], run.output  # refused, then built here to the pinned bytes
    assert "runs past the" in run.output and "announces; stopped there" in run.output
    assert not any((two / ".phibuild" / "tmp").iterdir())


def test_an_oversized_remote_manifest_is_damage(world):
    key = Lockfile(world / "one" / "artifacts.lock").get(ONNX).key
    manifest = world / "remote" / "keys" / key[:2] / f"{key}.json"
    manifest.chmod(0o644)
    with open(manifest, "ab") as handle:
        handle.truncate(reading.LIMITS["manifest"] + 10)
    two = project(world, "two", backends=("onnx",))
    shutil.copy(world / "one" / "artifacts.lock", two / "artifacts.lock")
    run = run_doit(two)
    assert run.code == 0 and run.built == [ONNX], run.output
    assert "larger than a manifest can be" in run.output


# -- 3. deep nesting -------------------------------------------------------------------------------------------


def deep_json() -> str:
    return "[" * DEEP + "]" * DEEP


@pytest.mark.parametrize("place", ["lock", "slice", "config.json", "manifest", "pyproject", "safetensors"])
def test_a_document_nested_thousands_deep_is_one_line_of_damage(world, place):
    one = world / "one"
    if place == "lock":
        (one / "artifacts.lock").write_text(f"version = 2\nx = {'[' * DEEP}{']' * DEEP}\n")
    elif place == "slice":
        (one / "slices").mkdir()
        (one / "slices" / "a.lock").write_text(f"version = 2\nx = {'[' * DEEP}{']' * DEEP}\n")
    elif place == "config.json":
        (world / "model" / "config.json").write_text(f'{{"architectures": ["Phi3ForCausalLM"], "x": {deep_json()}}}')
    elif place == "manifest":
        key = Lockfile(one / "artifacts.lock").get(ONNX).key
        (one / ".phibuild" / "objects" / key[:2] / key / "manifest.json").write_text(deep_json())
    elif place == "pyproject":
        (one / "pyproject.toml").write_text(f"[tool.phibuild]\nmodels = {'[' * DEEP}{']' * DEEP}\n")
    else:
        shard = world / "model" / "model.safetensors"
        header = json.dumps({"x": json.loads("[" * 40 + "]" * 40)}).encode()
        shard.write_bytes(struct.pack("<Q", len(header)) + header)
    run = run_doit(one, "assemble" if place == "slice" else f"quantize:{ONNX}")
    assert "Traceback" not in run.output and "RecursionError" not in run.output, run.output
    if place == "manifest":  # damage in the store: rebuilt
        assert run.code == 0 and "damaged" in run.output, run.output
    else:
        assert run.code != 0 and "nested" in run.output, run.output


# -- 4. provenance: unpinned remote entries -------------------------------------------------------------------


def poison(world: Path, key: str) -> None:
    """What a hostile remote writer can do: new bytes under a key, with a manifest that describes them."""
    from phibuild.hashing import hash_file

    manifest_path = world / "remote" / "keys" / key[:2] / f"{key}.json"
    data = json.loads(manifest_path.read_text())
    name = sorted(data["files"])[0]
    evil = world / "evil.bin"
    evil.write_bytes(os.urandom(1000))
    digest = hash_file(evil, with_sha256=True)
    blob = world / "remote" / "blobs" / digest.xxh3_128[:2] / digest.xxh3_128
    blob.parent.mkdir(exist_ok=True)
    shutil.copy(evil, blob)
    data["files"][name] = digest.to_dict()
    manifest_path.chmod(0o644)
    manifest_path.write_text(json.dumps(data))


@pytest.mark.parametrize("poisoned", [False, True])
def test_an_unpinned_pull_is_marked_and_not_shipped_until_rebuilt_here(world, poisoned):
    key = Lockfile(world / "one" / "artifacts.lock").get(ONNX).key
    if poisoned:
        poison(world, key)
    two = project(world, "two", backends=("onnx",), extra='[tool.phibuild.publish]\nrepo = "me/{target}"\n')
    run = run_doit(two)  # an empty lock: nothing pinned
    assert run.code == 0 and run.built == [], run.output
    entry = Lockfile(two / "artifacts.lock").get(ONNX)
    assert entry.smoke.unverified and entry.smoke.pulled_from
    shutil.rmtree(two / ".phibuild")  # pulled again, by the pin of an entry nobody vouched for: still unvouched
    assert run_doit(two).code == 0 and Lockfile(two / "artifacts.lock").get(ONNX).smoke.unverified
    (two / "artifacts.lock").unlink()  # and taken from the store into a lock of its own: still unvouched
    assert run_doit(two).code == 0 and Lockfile(two / "artifacts.lock").get(ONNX).smoke.unverified
    info = run_doit(two, "info", f"quantize:{ONNX}")
    assert "UNVERIFIED" in info.output
    for command in ("release", "publish"):
        refused = run_doit(two, command)
        one_line(refused)
        assert "without a trusted signature" in refused.output
    assert not (two / "release").exists()
    reproduced = run_doit(two, f"reproduce:{ONNX}")
    if poisoned:
        assert reproduced.code != 0 and "NOT reproducible" in reproduced.output
        assert Lockfile(two / "artifacts.lock").get(ONNX).smoke.unverified
        one_line(run_doit(two, "release"))
    else:
        assert reproduced.code == 0, reproduced.output
        assert Lockfile(two / "artifacts.lock").get(ONNX).smoke.pulled_from is None  # checked here now
        assert run_doit(two, "release").code == 0


def test_an_unvouched_artifact_vouches_for_nothing_it_names(world):
    """The intermediate an unvouched artifact's manifest names is no pin: when the artifact's key changes, the
    intermediate is built here, not pulled as "pinned" from the remote that sent the artifact."""
    two = project(world, "two", backends=("gguf",))
    assert run_doit(two).code == 0
    entry = Lockfile(two / "artifacts.lock").get(GGUF)
    assert entry.smoke.unverified and entry.intermediate is not None
    (two / "pyproject.toml").write_text((two / "pyproject.toml").read_text()
                                        + '\n[tool.phibuild.params.gguf.int4]\ntype = "Q4_0"\n')
    run = run_doit(two, f"quantize:{GGUF}")
    assert run.code == 0, run.output
    assert run.built == ["a-gguf-f16", GGUF], run.output
    assert "is not pinned by artifacts.lock and not signed" in run.output


@pytest.mark.parametrize(("url", "shown"), [
    ("http://ci:hunter2@127.0.0.1:9/store?X-Amz-Signature=abc#x", "http://127.0.0.1:9/store"),
    ("simplecache::http://alice:hunter2@127.0.0.1:8765", "simplecache::http://127.0.0.1:8765"),
    ("http://alice:hun@ter2@h:9/p", "http://h:9/p"),
    ("sftp://u;fingerprint=hunter2@h/p", "sftp://h/p"),
    ("blockcache::s3://b/p?token=hunter2::s3://c", "blockcache::s3://b/p::s3://c"),
    ("s3://bucket/phibuild", "s3://bucket/phibuild"),
    ("https://[::1]:8080/p", "https://[::1]:8080/p"),
])
def test_a_remotes_credentials_are_never_shown_or_recorded(url, shown):
    remote = Remote(url)
    assert remote.url == shown and remote.address == url
    assert "hunter2" not in remote.caches


def test_figures_that_could_not_be_checked_here_are_marked_on_the_card(world):
    """A fidelity record whose measurement is neither in the store nor on the remote stands, as the lock's word,
    and the card says that it was not checked."""
    committed = parse((REPO / "artifacts.lock").read_text(), REPO / "artifacts.lock").artifacts
    record = next(entry.fidelity for entry in committed.values() if entry.fidelity and entry.fidelity.kl)
    lock = Lockfile(world / "one" / "artifacts.lock")
    lock.put(ONNX, replace(lock.get(ONNX), fidelity=record))
    assert run_doit(world / "one", "release").code == 0
    card = (world / "one" / "release" / ONNX / "MODEL_CARD.md").read_text()
    assert "they were not checked against it there" in card


def test_an_unpinned_unsigned_intermediate_or_measurement_is_never_pulled(world):
    one = world / "one"
    entry = Lockfile(one / "artifacts.lock").get(GGUF)
    remote = Remote(str(world / "remote"))
    store_root = world / "scratch-store"
    from phibuild.store import Store

    store = Store(store_root)
    assert remote.pull(entry.intermediate.key, None, store) is None  # an intermediate: not pulled unpinned
    assert remote.pull(entry.intermediate.key, entry.intermediate.files, store) is not None  # pinned: pulled
    manifest = remote.manifest(entry.key)
    measurement = replace(manifest, smoke=None, parts=replace(manifest.parts, precision=MEASUREMENT))
    with pytest.raises(DamageError, match="pulled only when pinned or signed"):
        remote._vouched(measurement.key, measurement, None)


@pytest.fixture
def keys(tmp_path) -> tuple[Path, str, str]:
    """A writer's secret key file, its public key, and a stranger's public key."""
    secret = tmp_path / "ci-1.key"
    assert signing.main(["ci-1", str(secret)]) == 0
    public = signing.SecretKey.from_file(secret).public().to_text()
    stranger = signing.SecretKey.generate("ci-1").public().to_text()  # the same name, another key
    return secret, public, stranger


def test_signed_entries_round_trip_with_a_trusted_key_and_are_refused_otherwise(world, keys, monkeypatch):
    secret, public, stranger = keys
    monkeypatch.setenv("PHIBUILD_SIGNING_KEY", str(secret))
    shutil.rmtree(world / "remote")
    signed = project(world, "signer", backends=("onnx",))
    assert run_doit(signed).code == 0
    assert list((world / "remote" / "keys").rglob("*.sig"))
    monkeypatch.delenv("PHIBUILD_SIGNING_KEY")

    trusting = project(world, "trusting", backends=("onnx",), extra=f"trusted_keys = [{json.dumps(public)}]\n")
    run = run_doit(trusting)
    assert run.code == 0 and run.built == [], run.output
    smoke = Lockfile(trusting / "artifacts.lock").get(ONNX).smoke
    assert smoke.trusted_by == "signed by ci-1" and not smoke.unverified
    assert run_doit(trusting, "release").code == 0

    wary = project(world, "wary", backends=("onnx",), extra=f"trusted_keys = [{json.dumps(stranger)}]\n")
    run = run_doit(wary)
    assert run.code == 0 and run.built == [ONNX], run.output  # refused, built here
    assert "not signed by a key in trusted_keys" in run.output
    assert Lockfile(wary / "artifacts.lock").get(ONNX).smoke.pulled_from is None


def test_unsigned_entries_are_refused_where_keys_are_trusted(world, keys):
    _, public, _ = keys
    two = project(world, "two", backends=("onnx",), extra=f"trusted_keys = [{json.dumps(public)}]\n")
    shutil.copy(world / "one" / "artifacts.lock", two / "artifacts.lock")  # pinned, yet unsigned
    run = run_doit(two)
    assert run.code == 0 and run.built == [ONNX], run.output
    assert "not signed by a key in trusted_keys" in run.output


def test_a_public_key_is_no_signing_key(world, keys, monkeypatch, tmp_path):
    _, public, _ = keys
    (tmp_path / "public.key").write_text(public + "\n")
    monkeypatch.setenv("PHIBUILD_SIGNING_KEY", str(tmp_path / "public.key"))
    run = run_doit(world / "one", "list")
    one_line(run)
    assert "PHIBUILD_SIGNING_KEY" in run.output


@pytest.mark.parametrize("key", ["ci-1:short", "no-colon", "CI:" + "A" * 44, 'ci:""'])
def test_a_malformed_trusted_key_is_a_settings_error(tmp_path, key):
    root = write_project(tmp_path / "p", ["phi3-tiny"], ["onnx"], ["int4"],
                         extra=f"trusted_keys = [{json.dumps(key)}]\n")
    run = run_doit(root, "list")
    one_line(run)
    assert "trusted_keys" in run.output


# -- 5 and 6. records: validated where read, and before they are written --------------------------------------


def committed_lock() -> str:
    return (REPO / "artifacts.lock").read_text()


@pytest.mark.parametrize(("old", "new", "message"), [
    ("top1 = ", "top1 = 5.0 #", "must be a share from 0 to 1"),
    ("ppl = ", "ppl = 0 #", "must be a perplexity"),
    ("prefill_tps = ", "prefill_tps = 0 #", "above zero"),
    ("decode_tps = ", "decode_tps = -1.0 #", "zero or more"),
    ("kl = ", "kl = nan #", "finite number"),
    ("kl = ", "kl_missing = 1 #", "unknown field"),
    ('python = "cpython-3.11"', 'python = "cpython-3.11; rm -rf ~"', "is not of the form"),
    ('numpy = "', '"numpy; rm -rf ~" = "', "is not a Python distribution name"),
    ('numpy = "', 'numpy = "1.0 && curl x|sh" #"', "is not a PEP 440 version"),
    ('license = "mit"', 'license = "mit\\u001b[31m"', "is not of the form"),
])
def test_a_lock_record_out_of_its_range_is_refused_in_one_line(old, new, message):
    text = committed_lock()
    assert old in text
    with pytest.raises(LockError, match=message.replace("(", r"\(")):
        parse(text.replace(old, new, 1), Path("artifacts.lock"))


@pytest.mark.parametrize(("field", "value"), [("kl", math.nan), ("top1", 1.5), ("runtime", "onnx\nruntime"),
                                               ("ppl", math.inf), ("prefill_tps", 0.0)])
def test_phibuild_never_writes_a_lock_it_would_refuse_to_read(tmp_path, field, value):
    path = tmp_path / "artifacts.lock"
    path.write_text(committed_lock())
    lock = Lockfile(path)
    name, entry = sorted((n, e) for n, e in lock.read().artifacts.items() if e.fidelity and e.fidelity.kl)[0]
    before = path.read_bytes()
    with pytest.raises(LockError, match="not written, as it would not read back"):
        lock.put(name, replace(entry, fidelity=replace(entry.fidelity, **{field: value})))
    assert path.read_bytes() == before


@pytest.mark.parametrize(("license", "kept"), [("mit\t", "mit"), ("'Apache-2.0'", "apache-2.0"),
                                              ("mit\x1b[31m", None), ("apache 2.0 (see LICENSE)", None),
                                              ("x" * 300, None), ("mit\u202e", None)])
def test_a_license_from_a_model_card_is_passed_on_clean_or_not_at_all(tmp_path, license, kept):
    (tmp_path / "README.md").write_text(f"---\nlicense: {license}\n---\n# a model\n")
    assert sources.card_license(tmp_path / "README.md") == kept


def test_a_model_card_with_escape_codes_builds_and_its_lock_reads_back(tmp_path):
    model = copy_model("phi3-tiny", tmp_path / "model")
    (model / "README.md").write_text("---\nlicense: mit\x1b[31m\tred\n---\n# a model\n")
    root = write_project(tmp_path / "p", ["a"], ["gguf"], ["int4"], local={"a": model})
    run = run_doit(root, "quantize:a-int4-gguf")
    assert run.code == 0, run.output
    assert Lockfile(root / "artifacts.lock").get("a-int4-gguf").license is None


# -- 7 and 8. commands printed, switches and settings read strictly -------------------------------------------


@pytest.mark.parametrize(("value", "ok"), [("1", True), ("on", True), ("TRUE", True), ("off", True), ("", True),
                                           ("2", False), ("enabled", False), ("y", False)])
def test_a_boolean_switch_takes_its_documented_values_and_refuses_the_rest(tmp_path, monkeypatch, value, ok):
    monkeypatch.setenv("PHIBUILD_FROZEN", value)
    root = write_project(tmp_path / "p", ["phi3-tiny"], ["onnx"], ["int4"])
    run = run_doit(root, "list")
    if ok:
        assert run.code == 0, run.output
    else:
        one_line(run)
        assert "PHIBUILD_FROZEN" in run.output and "neither on" in run.output


@pytest.mark.parametrize(("text", "message"), [
    ("[tool.phibuid]\nmodels = []\n", "did you mean [tool.phibuild]"),
    ("[tool.PHIBUILD]\nmodels = []\n", "did you mean [tool.phibuild]"),
    ("[tool.phibuild]\nrelease = [\"a-int4-onnx\", \"a-int4-onnx\"]\n", "more than once"),
    ("[tool.phibuild.publish]\nrepo = \"me/{target.__class__}\"\n", "it may use only"),
    ("[tool.phibuild.publish]\nrepo = \"me/{0}\"\n", "it may use only"),
    ("[tool.phibuild.publish]\nrepo = \"me/{target!r}\"\n", "it may use only"),
    ("[tool.phibuild.publish]\nrepo = \"{target}\"\n", "not a repository id"),
])
def test_settings_are_read_strictly(tmp_path, text, message):
    root = tmp_path / "p"
    root.mkdir()
    (root / "pyproject.toml").write_text(text)
    run = run_doit(root, "quantize:phi3-tiny-int4-onnx")
    one_line(run)
    assert message in run.output, run.output


def test_a_lock_in_a_directory_not_made_yet_is_written_there(tmp_path):
    root = write_project(tmp_path / "p", ["phi3-tiny"], ["gguf"], ["int4"], extra='lock = "locks/artifacts.lock"\n')
    run = run_doit(root, "quantize:phi3-tiny-int4-gguf")
    assert run.code == 0, run.output
    assert Lockfile(root / "locks" / "artifacts.lock").get("phi3-tiny-int4-gguf") is not None


def test_a_release_naming_no_target_of_the_project_is_one_line(world):
    one = world / "one"
    (one / "pyproject.toml").write_text((one / "pyproject.toml").read_text().replace(
        "[tool.phibuild]\n", '[tool.phibuild]\nrelease = ["nope-int4-gguf"]\n'))
    run = run_doit(one, "release")
    one_line(run)
    assert "which this project does not build" in run.output


def test_a_manifest_naming_a_file_and_a_directory_alike_is_refused():
    from phibuild.records import FILES
    from phibuild.validate import Invalid

    digest = {"size": 1, "xxh3_128": "0" * 32, "sha256": "0" * 64}
    with pytest.raises(Invalid, match="both as a file and as a directory"):
        FILES({"a": digest, "a/b": digest}, "its files")
    assert set(FILES({"a/b": digest, "a/c": digest, "ab": digest}, "its files")) == {"a/b", "a/c", "ab"}


def test_phibuild_remote_is_checked_as_the_setting_is(tmp_path, monkeypatch):
    monkeypatch.setenv("PHIBUILD_REMOTE", "s3://bucket/x\n; rm -rf ~")
    root = write_project(tmp_path / "p", ["phi3-tiny"], ["onnx"], ["int4"])
    run = run_doit(root, "list")
    one_line(run)
    assert "PHIBUILD_REMOTE" in run.output


# -- 9. no tracebacks ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["[tool.phibuild\n", "x = = 1\n", "\x00\x01", "tool = 5\n",
                                  "[tool]\ndoit = 5\n", f"x = {'9' * 5000}\n",
                                  f"x = {'[' * DEEP}{']' * DEEP}\n"])
def test_a_pyproject_toml_that_is_not_toml_is_one_line_from_doit_itself(tmp_path, text):
    (tmp_path / "pyproject.toml").write_text(text)
    done = doit_bounded(tmp_path, "list")
    output = done.stdout + done.stderr
    assert done.returncode != 0 and "Traceback" not in output and "pyproject.toml" in output, output
    one_line(run_doit(tmp_path, "list"))  # in-process too


@pytest.mark.parametrize("text", [f"version = {'9' * 5000}\n", "version = 2\n[artifacts.x]\nmodel = 5\n",
                                  "version = 2\nartifacts = 5\n"])
def test_a_lock_that_python_cannot_convert_is_one_line(world, text):
    (world / "one" / "artifacts.lock").write_text(text)
    for command in ("list", f"quantize:{ONNX}", "release"):
        run = run_doit(world / "one", command)
        one_line(run)


def test_a_corrupt_stat_cache_is_only_a_lost_cache(world):
    (world / "one" / ".phibuild" / "statcache.sqlite").write_bytes(b"this is no database" * 100)
    for name in ("statcache.sqlite-wal", "statcache.sqlite-shm"):
        (world / "one" / ".phibuild" / name).unlink(missing_ok=True)
    run = run_doit(world / "one")
    assert run.code == 0 and run.built == [], run.output


@pytest.mark.parametrize("pattern", ["", "/tmp/*.lock", "slices/[", "slices/**/x/../*.lock"])
def test_assemble_with_a_glob_it_cannot_use_is_one_line(world, pattern):
    run = run_doit(world / "one", "assemble", f"--slices={pattern}")
    one_line(run)


def test_an_empty_command_line_argument_is_one_line(world):
    done = doit_bounded(world / "one", "assemble", "--slices", "")
    output = done.stdout + done.stderr
    assert done.returncode != 0 and "Traceback" not in output and "empty argument" in output, output
    run = run_doit(world / "one", "assemble", "--slices", "")
    one_line(run)
    assert "empty argument" in run.output


# -- 10 and 12. release and publish act on the lock; commands say what they do ---------------------------------


def test_publish_refuses_a_release_whose_files_were_swapped_with_their_sums(world):
    one = world / "one"
    (one / "pyproject.toml").write_text((one / "pyproject.toml").read_text()
                                        + '\n[tool.phibuild.publish]\nrepo = "me/{target}"\n')
    assert run_doit(one, "release").code == 0
    swapped = one / "release" / ONNX / "genai_config.json"
    swapped.write_text('{"evil": true}')
    sums = one / "release" / "SHA256SUMS"
    import hashlib

    digest = hashlib.sha256(swapped.read_bytes()).hexdigest()
    sums.write_text("".join(f"{digest}  {ONNX}/genai_config.json\n" if line.endswith(f"{ONNX}/genai_config.json")
                            else line + "\n" for line in sums.read_text().splitlines()))
    from phibuild import publish as publishing
    from phibuild.project import Project

    with pytest.raises(BuildError, match=r"is not the file artifacts\.lock pins"):
        publishing.publish(Project.load(one), one / "release")


def test_reproduce_takes_its_lock_option_on_the_group_and_refuses_a_missing_one(world):
    one = world / "one"
    shutil.copy(one / "artifacts.lock", one / "other.lock")
    run = run_doit(one, "reproduce", "--lock", "other.lock")
    assert run.code == 0, run.output
    assert run.output.count("identical to other.lock") == 2
    missing = run_doit(one, f"reproduce:{ONNX}", "--lock", "missing.lock")
    one_line(missing)
    assert "no such lock file" in missing.output


# -- 11. safetensors as strict as safetensors ------------------------------------------------------------------


def shard(path: Path, header: dict, data: bytes) -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


@pytest.mark.parametrize(("header", "size", "message"), [
    ('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
     '"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', 8, "is given twice"),
    ('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
     '"b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}', 12, "an overlap"),
    ('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
     '"b": {"dtype": "F32", "shape": [1], "data_offsets": [12, 16]}}', 16, "a gap"),
    ('{"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}', 8, "need 12 bytes"),
    ('{"a": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}', 8, "unknown dtype"),
    ('{"a": {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}}', 8, "not two whole numbers"),
    ('{"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}', 8, "not a list of whole numbers"),
    ('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "extra": 1}}', 8, "exactly dtype"),
    ('{"__metadata__": {"format": 1}}', 0, "__metadata__"),
])
def test_a_safetensors_header_is_read_as_strictly_as_safetensors_reads_it(tmp_path, header, size, message):
    text = header.encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"\0" * size)
    with pytest.raises(SourceError, match=message):
        sources.check_safetensors(path)


def test_a_well_formed_safetensors_file_passes(tmp_path):
    header = {"__metadata__": {"format": "pt"}, "b": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [8, 16]},
              "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    sources.check_safetensors(shard(tmp_path / "x.safetensors", header, b"\0" * 16))


# -- 13. nothing written under the home directory --------------------------------------------------------------


def test_the_report_writes_nothing_under_the_home_directory(world, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home)}
    env.pop("MPLCONFIGDIR", None)
    done = subprocess.run([sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), "-d", str(world / "one"),
                           "report"], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert list(home.rglob("*")) == []
    assert (world / "one" / ".phibuild" / "matplotlib").is_dir()
