"""Hostile and broken input, at every edge where phibuild reads from outside: settings, model directories, the
lock, slice locks, the store, the remote, the disk. Each case gets one line of error (or is refused and built
locally), writes nothing outside the project's store, build, release and lock, and never ships, restores or
re-pins a damaged or tampered entry.

Most cases start from ``world`` (conftest.py): a project that built phi3-tiny at int4 through ONNX and GGUF and
pushed it to a remote directory beside it, copied afresh for each test so that each can break its own copy.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import resource
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import closed_port, copy_model, doit_process, lock_of, run_doit, write_project
from conftest import world_project as project

from phibuild import tasks
from phibuild.errors import file_system_error
from phibuild.lockfile import Lockfile

ONNX, GGUF = "a-int4-onnx", "a-int4-gguf"


def remote_manifest(top: Path, key: str) -> Path:
    return top / "remote" / "keys" / key[:2] / f"{key}.json"


def rewrite_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.chmod(0o644)
    path.write_text(json.dumps(data))


def no_traceback(output: str) -> None:
    assert "Traceback" not in output, output


# -- writes outside the project -------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["../../escaped.bin", "/tmp/phibuild-escaped.bin", "sub/../../escaped.bin"])
def test_a_remote_manifest_naming_files_outside_the_artifact_is_refused(world, bad):
    key = Lockfile(world / "one" / "artifacts.lock").get(ONNX).key
    rewrite_json(remote_manifest(world, key), lambda m: m["files"].update({bad: m["files"].pop("genai_config.json")}))
    two = project(world, "two")
    run = run_doit(two, f"quantize:{ONNX}")
    assert run.code == 0 and run.built == [ONNX], run.output
    assert f"remote entry {key} on " in run.output and "is not a plain relative path inside the artifact" in run.output
    assert not (two / "build" / "escaped.bin").exists() and not (world / "escaped.bin").exists()
    assert not Path("/tmp/phibuild-escaped.bin").exists()
    no_traceback(run.output)


def test_a_tampered_intermediate_on_the_remote_is_refused_in_frozen_mode_too(world, monkeypatch):
    lock = Lockfile(world / "one" / "artifacts.lock").get(GGUF)
    rewrite_json(remote_manifest(world, lock.intermediate.key),
                 lambda m: m["files"].update({"../../escaped.gguf": m["files"].pop("model.gguf")}))
    remote_manifest(world, lock.key).unlink()  # so that the intermediate is what is pulled
    two = project(world, "two")
    shutil.copy(world / "one" / "artifacts.lock", two / "artifacts.lock")
    monkeypatch.setenv("PHIBUILD_FROZEN", "1")
    run = run_doit(two, f"quantize:{GGUF}")
    assert run.code == 0, run.output
    assert run.built == ["a-gguf-f16", GGUF]  # refused, so built here, to the locked bytes
    assert f"remote entry {lock.intermediate.key}" in run.output
    assert not list(world.rglob("escaped.gguf"))
    assert lock_of(two) == lock_of(world / "one")


@pytest.mark.parametrize(("field", "value", "message"), [
    ("name", "../../X", "must be a name of lowercase letters, digits"),
    ("key", "../../dir", "key must be 32 lowercase hex digits, not '../../dir'"),
])
def test_a_slice_lock_with_a_path_for_a_name_or_key_is_refused(world, field, value, message):
    slices = world / "one" / "slices"
    slices.mkdir()
    text = (world / "one" / "artifacts.lock").read_text()
    entry = Lockfile(world / "one" / "artifacts.lock").get(ONNX)
    text = text.replace(f"[artifacts.{ONNX}", f'[artifacts."{value}"') if field == "name" else text.replace(
        f'key = "{entry.key}"', f'key = "{value}"')
    (slices / "job.lock").write_text(text)
    before = (world / "one" / "artifacts.lock").read_bytes()
    run = run_doit(world / "one", "assemble")
    assert run.code != 0 and message in run.output, run.output
    assert (world / "one" / "artifacts.lock").read_bytes() == before
    assert run_doit(world / "one", "release").code == 0
    assert not (world / "X").exists() and not (world.parent / "X").exists()
    no_traceback(run.output)


def test_a_model_named_like_a_path_is_a_settings_error(tmp_path):
    root = write_project(tmp_path / "p", ["phi3-tiny"], ["onnx"], ["int4"],
                         extra=f'[tool.phibuild.model."../../X"]\npath = "{tmp_path / "model"}"\n')
    run = run_doit(root, "list")
    assert run.code != 0 and "the model name must be a name of lowercase letters" in run.output, run.output
    no_traceback(run.output)


def test_a_damaged_local_manifest_is_rebuilt_not_followed(world):
    entry = Lockfile(world / "one" / "artifacts.lock").get(ONNX)
    manifest = world / "one" / ".phibuild" / "objects" / entry.key[:2] / entry.key / "manifest.json"
    rewrite_json(manifest, lambda m: m["files"].update({"../escaped": m["files"].pop("genai_config.json")}))
    shutil.rmtree(world / "one" / "build" / ONNX)
    run = run_doit(world / "one", f"quantize:{ONNX}")
    assert run.code == 0, run.output
    assert f"store entry {entry.key} is damaged" in run.output
    assert "pulled from the remote" in run.output  # the remote's copy is intact, and matches the lock
    assert not list(world.rglob("escaped"))
    assert Lockfile(world / "one" / "artifacts.lock").get(ONNX) == entry


# -- the lock decides -----------------------------------------------------------------------------


def edit_lock(root: Path, old: str, new: str) -> None:
    path = root / "artifacts.lock"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize("digest", ["xxh3_128", "sha256"])
def test_a_lock_edited_by_hand_is_never_re_pinned(world, digest, monkeypatch):
    root = world / "one"
    entry = Lockfile(root / "artifacts.lock").get(ONNX)
    want = entry.files["genai_config.json"]
    forged = ("f" * 32) if digest == "xxh3_128" else ("f" * 64)
    edit_lock(root, getattr(want, digest), forged)
    (root / "pyproject.toml").write_text((root / "pyproject.toml").read_text().replace('remote = "../remote"\n', ""))
    info = run_doit(root, "info", f"quantize:{ONNX}")
    assert "the store entry's files are not the ones artifacts.lock pins: genai_config.json" in info.output
    run = run_doit(root, f"quantize:{ONNX}")  # built again, which tells that the lock is what is wrong
    assert run.code != 0, run.output
    assert (f"{ONNX}: artifacts.lock pins other files for key {entry.key} than the store holds (genai_config.json: "
            f"{digest}") in run.output
    assert "building it again gives the store's: the lock was edited" in run.output
    assert getattr(Lockfile(root / "artifacts.lock").get(ONNX).files["genai_config.json"], digest) == forged
    assert (root / ".phibuild" / "objects" / entry.key[:2] / entry.key).is_dir()  # the intact entry is kept
    assert run_doit(root, "verify").code != 0
    no_traceback(run.output)

    monkeypatch.setenv("PHIBUILD_REPIN", "1")
    run = run_doit(root, f"quantize:{ONNX}")
    assert run.code == 0, run.output
    assert "re-pinned to the store's entry (PHIBUILD_REPIN)" in run.output
    assert Lockfile(root / "artifacts.lock").get(ONNX) == entry


def test_a_store_file_forged_with_its_manifest_is_not_restored(world):
    root = world / "one"
    entry = Lockfile(root / "artifacts.lock").get(ONNX)
    stored = root / ".phibuild" / "objects" / entry.key[:2] / entry.key
    forged = b'{"forged": true}\n'
    (stored / "artifact" / "genai_config.json").write_bytes(forged)
    from phibuild.hashing import hash_file

    digest = hash_file(stored / "artifact" / "genai_config.json", with_sha256=True)
    rewrite_json(stored / "manifest.json", lambda m: m["files"].update({"genai_config.json": digest.to_dict()}))
    shutil.rmtree(root / "build" / ONNX)
    run = run_doit(root, f"quantize:{ONNX}")  # built again, which tells that the store's entry is what is wrong
    assert run.code == 0, run.output
    assert f"artifacts.lock pins other files for key {entry.key} than the store holds (genai_config.json" in run.output
    assert "built again: the store's entry was not the one the lock pins, and the build agrees with it" in run.output
    assert (root / "build" / ONNX / "genai_config.json").read_bytes() != forged
    assert (stored / "artifact" / "genai_config.json").read_bytes() != forged
    assert Lockfile(root / "artifacts.lock").get(ONNX) == entry


def rot(path: Path) -> None:
    """Flip a bit in the middle of ``path``, keeping its size and times, as failing media do."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_bit_rot_in_the_store_is_neither_released_nor_restored(world):
    root = world / "one"
    entry = Lockfile(root / "artifacts.lock").get(GGUF)
    rot(root / ".phibuild" / "objects" / entry.key[:2] / entry.key / "artifact" / "model.gguf")
    release = run_doit(root, "release")
    assert release.code != 0
    assert (f"{GGUF}: model.gguf in the store is damaged (it no longer matches its manifest); the entry is removed: "
            f"`doit quantize:{GGUF}` builds or restores it again") in release.output
    assert not (root / "release").exists()
    assert not (root / ".phibuild" / "objects" / entry.key[:2] / entry.key).exists()
    no_traceback(release.output)

    run = run_doit(root, f"quantize:{GGUF}")  # the advice works: the rotten entry is no longer taken for fresh
    assert run.code == 0, run.output
    assert f"{GGUF}: pulled from the remote" in run.output
    release = run_doit(root, "release")
    assert release.code == 0, release.output
    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=root / "release", capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize(("smoke", "message"), [
    ({"result": "ok: 8 tokens\n\x1b[2J forged"}, "must be one line of printable text"),
    ({"result": "ok: " + "x" * 5000}, "must be one line of printable text of at most 2000 characters"),
    (None, "an artifact records its smoke check, an intermediate or measurement none"),
])
def test_a_remote_smoke_result_is_checked_and_marked_as_pulled(world, smoke, message):
    key = Lockfile(world / "one" / "artifacts.lock").get(ONNX).key
    rewrite_json(remote_manifest(world, key), lambda m: m.pop("smoke") if smoke is None else m.update(smoke=smoke))
    two = project(world, "two", backends=("onnx",))
    run = run_doit(two)
    assert run.code == 0 and run.built == [ONNX], run.output
    assert message in run.output
    assert "\x1b" not in (two / "artifacts.lock").read_text()
    assert Lockfile(two / "artifacts.lock").get(ONNX).smoke.pulled_from is None  # it ran here
    (two / "pyproject.toml").write_text((two / "pyproject.toml").read_text().replace('remote = "../remote"\n', ""))
    assert run_doit(two).code == 0  # nothing of the refused manifest stayed behind


# -- one message, never a traceback ---------------------------------------------------------------


@pytest.mark.parametrize(("link", "message"), [
    ("nowhere", "No such file or directory; it does not exist (or is a symlink to nothing)"),
    ("special_tokens_map.json", "Too many levels of symbolic links; it is a symlink loop"),
])
def test_a_broken_symlink_in_a_model_directory_is_one_line(tmp_path, link, message):
    model = copy_model("phi3-tiny", tmp_path / "model")
    (model / "special_tokens_map.json").symlink_to(model / link)  # to nothing, or to itself
    root = project(tmp_path, "p", model, remote="", backends=("gguf",))
    run = run_doit(root)
    assert run.code != 0 and message in run.output, run.output
    assert f"{model / 'special_tokens_map.json'}" in run.output
    no_traceback(run.output)


@pytest.mark.parametrize(("settings", "message"), [
    ("store = 5\n", "store must be a string, not a number"),
    ("[tool.phibuild.params]\nonnx = 5\n", "[tool.phibuild].params must hold one table per entry"),
    ("[tool.phibuild.params.onnx]\nint4 = 64\n", "params.onnx].int4 must be a table of parameters"),
    ("[tool.phibuild.params.onnx.in4]\nblock_size = 64\n", "'in4' is not a precision of backend onnx (did you mean "
                                                           "'int4'?)"),
    ("[tool.phibuild.params.onnx]\nblok_size = 64\n", "'blok_size' is not a parameter of backend onnx (did you "
                                                      "mean 'block_size'?)"),
    ("[tool.phibuild.params.onnx.int4]\nblock_size = [64]\n", "block_size must be a string, number or true/false"),
    ("[tool.phibuild.params.tensorrt]\nx = 1\n", "'tensorrt' is not a backend"),
    ('remote_timeout = "x"\n', "remote_timeout must be a positive number of seconds, at most 604800 (a week), not 'x'"),
    ("remote_timeout = -1\n", "remote_timeout must be a positive number of seconds, at most 604800 (a week), not -1"),
    ("models = [1]\n", "models must be a list of strings"),
    ("remote_options = 5\n", "remote_options must be a table, not a number"),
    ('default = ["../x"]\n', "default[0] must be a name of lowercase letters"),
    ('[tool.phibuild.model.mine]\npath = 5\n', "[tool.phibuild.model.mine].path must be a string"),
    ('[tool.phibuild.model.mine]\nrepo = "../../etc"\n', "must be a Hugging Face repository id"),
    ('[tool.phibuild.model.mine]\npath = "x"\ntrust_remote_code = "yes"\n', "trust_remote_code must be true or false"),
])
def test_mistyped_settings_are_one_line_and_nothing_is_silently_ignored(tmp_path, settings, message):
    text = f"[tool.phibuild]\nmodels = [\"phi3-tiny\"]\nbackends = [\"onnx\"]\nprecisions = [\"int4\"]\n{settings}"
    if settings.startswith("models"):
        text = text.replace('models = ["phi3-tiny"]\n', "")
    (tmp_path / "pyproject.toml").write_text(text)
    for command in (["list"], []):
        run = run_doit(tmp_path, *command)
        assert run.code != 0 and message in run.output, run.output
        no_traceback(run.output)
    assert not (tmp_path / "artifacts.lock").exists() and not (tmp_path / "build").exists()


def test_a_read_only_lock_and_a_lock_that_is_a_directory_are_one_line(world):
    root = world / "one"
    lock = root / "artifacts.lock"
    shutil.rmtree(root / "build" / ONNX)
    lock.chmod(0o444)
    run = run_doit(root, f"quantize:{ONNX}")  # restored from the store; the unchanged lock needs no write
    assert run.code == 0, run.output
    (root / "pyproject.toml").write_text((root / "pyproject.toml").read_text().replace('["int4"]', '["int4", "fp16"]'))
    run = run_doit(root, "quantize:a-fp16-gguf")
    assert run.code != 0 and "artifacts.lock is read-only, so the build was not pinned in it: make it writable" in \
        run.output, run.output
    no_traceback(run.output)

    lock.chmod(0o644)
    lock.unlink()
    lock.mkdir()
    for command in (["list"], [], ["verify"]):
        run = run_doit(root, *command)
        assert run.code != 0, run.output
        assert "lock = 'artifacts.lock' must name a file ending in .lock" in run.output
        no_traceback(run.output)


@contextlib.contextmanager
def read_only(directory: Path) -> Iterator[None]:
    """``directory`` read-only for this process: a read-only bind mount as root (whom permissions do not
    stop), the write bits removed otherwise."""
    if os.geteuid() == 0:
        mounted = subprocess.run(["mount", "--bind", "-o", "ro", str(directory), str(directory)],
                                 capture_output=True, text=True)
        if mounted.returncode != 0:
            pytest.fail(f"cannot make {directory} read-only as root without a bind mount: {mounted.stderr}")
        subprocess.run(["mount", "-o", "remount,bind,ro", str(directory)], check=True)
        try:
            yield
        finally:
            tasks.forget_projects()  # close the stat cache's database, which holds the mount
            subprocess.run(["umount", str(directory)], check=True)
        return
    modes = {path: path.stat().st_mode for path in [directory, *directory.rglob("*")]}
    for path in modes:
        path.chmod(modes[path] & ~0o222)
    try:
        yield
    finally:
        for path, mode in modes.items():
            path.chmod(mode)


def test_a_read_only_store_is_read_from_and_only_a_build_fails(world):
    root = world / "one"
    (root / "pyproject.toml").write_text((root / "pyproject.toml").read_text().replace('remote = "../remote"\n', ""))
    with read_only(root / ".phibuild"):
        noop = run_doit(root)
        assert noop.code == 0 and noop.built == [] and noop.restored == [], noop.output
        shutil.rmtree(root / "build" / GGUF)
        restored = run_doit(root)
        assert restored.code == 0 and restored.restored == [GGUF], restored.output
        (root / "pyproject.toml").write_text(
            (root / "pyproject.toml").read_text().replace('["int4"]', '["int4", "fp32"]'))
        built = run_doit(root, "quantize:a-fp32-gguf")
        assert built.code != 0
        assert "Read-only file system" in built.output or "Permission denied" in built.output, built.output
        no_traceback(built.output)


def limited(size: int):
    """For a child process: files may not grow past ``size`` bytes (EFBIG, as a full disk refuses with ENOSPC)."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    return limit


def test_a_full_disk_is_one_line_wherever_the_write_fails(world):
    root = world / "one"
    (root / "pyproject.toml").write_text((root / "pyproject.toml").read_text().replace('remote = "../remote"\n', ""))
    outputs = {}
    # the copy of model.onnx.data (1.7 MB) into build/, restored from the store
    shutil.rmtree(root / "build" / ONNX)
    outputs["copy"] = doit_process(root, f"quantize:{ONNX}", preexec_fn=limited(1 << 20)).communicate(timeout=600)[0]
    # the lock (a GGUF restore writes nothing else: a hardlink, and a stat cache that may fail quietly)
    shutil.rmtree(root / "build" / GGUF)
    Lockfile(root / "artifacts.lock").put(GGUF, None)
    outputs["lock"] = doit_process(root, f"quantize:{GGUF}", preexec_fn=limited(2048)).communicate(timeout=600)[0]
    # llama.cpp's quantizer, whose only word is "returned 1"
    (root / "pyproject.toml").write_text((root / "pyproject.toml").read_text().replace('["int4"]', '["int4", "int8"]'))
    outputs["quantizer"] = doit_process(root, "quantize:a-int8-gguf", preexec_fn=limited(1 << 20)).communicate(
        timeout=600)[0]
    assert "File too large; the file is larger than this process may write (ulimit -f)" in outputs["copy"], outputs
    assert "writing artifacts.lock: " in outputs["lock"] and "File too large" in outputs["lock"], outputs
    assert ("llama.cpp could not quantize" in outputs["quantizer"]
            and "this process may not write files larger than 1048576 bytes (ulimit -f)" in outputs["quantizer"]), \
        outputs
    for output in outputs.values():
        no_traceback(output)
    assert not [p for p in root.iterdir() if p.name.startswith(".artifacts.lock")]
    assert not [p for p in (root / "build").iterdir() if p.name.startswith(".")]


def test_an_os_error_from_a_full_disk_says_what_to_do():
    with pytest.raises(OSError) as caught, open("/dev/full", "w") as full:
        full.write("x")
        full.flush()
    message = str(file_system_error(caught.value, "writing"))
    assert "No space left on device; free space on that file system (`doit gc --delete`" in message


# -- the remote and time --------------------------------------------------------------------------


class _Slow(SimpleHTTPRequestHandler):
    """Serves the remote's files; blobs either stall half-way or trickle, as a sick server does."""

    mode = "stall"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def copyfile(self, source, outputfile) -> None:
        if "/blobs/" not in self.path:
            return super().copyfile(source, outputfile)
        data = source.read()
        outputfile.write(data[: len(data) // 2])
        outputfile.flush()
        if self.mode == "stall":
            time.sleep(120)
        else:
            for byte in data[len(data) // 2:]:
                outputfile.write(bytes([byte]))
                outputfile.flush()
                time.sleep(0.2)


@pytest.mark.parametrize("mode", ["stall", "trickle"])
def test_a_remote_that_stalls_or_trickles_is_given_up_on_in_bounded_time(world, mode):
    handler = type("Handler", (_Slow,), {"mode": mode})
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(world / "remote")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        two = project(world, "two", remote=url, extra="remote_transfer_timeout = 4\n", backends=("onnx",))
        started = time.monotonic()
        run = run_doit(two)
        elapsed = time.monotonic() - started
    finally:
        server.shutdown()
        server.server_close()
    assert run.code == 0 and run.built == [ONNX], run.output
    assert run.output.count("phibuild: warning:") == 1, run.output  # said once, then built locally
    assert "failed pulling" in run.output and "building locally" in run.output
    assert elapsed < 60, f"{elapsed:.0f} s"  # unbounded, the stall alone would hold it for 120 s


def test_a_closed_port_is_reported_once(world):
    two = project(world, "two", remote=f"http://127.0.0.1:{closed_port()}")
    run = run_doit(two)
    assert run.code == 0 and sorted(run.built) == sorted(["a-gguf-f16", GGUF, ONNX]), run.output
    assert run.output.count("phibuild: warning:") == 1, run.output
    assert "is not usable (ClientConnectorError" in run.output


# -- leftovers ------------------------------------------------------------------------------------


def dead_pid() -> int:
    process = subprocess.run(["sh", "-c", "echo $$"], capture_output=True, text=True)
    return int(process.stdout)


def test_what_killed_runs_leave_beside_build_and_the_lock_is_swept(world):
    root = world / "one"
    pid = dead_pid()
    staging = root / "build" / f".{ONNX}.phibuild-{pid}-0a1b2c3d"
    (staging / "sub").mkdir(parents=True)
    (staging / "sub" / "model.onnx.data").write_bytes(b"half" * 1000)
    temporary = root / f".artifacts.lock.phibuild-{pid}-0a1b2c3d"
    temporary.write_text("half a lock")
    alive = root / "build" / f".{GGUF}.phibuild-{os.getpid()}-0a1b2c3d"
    alive.mkdir()  # a run in progress (this process): left alone
    run = run_doit(root, "list")
    assert run.code == 0
    assert not staging.exists() and not temporary.exists()
    assert alive.exists()


# -- the model's own code -------------------------------------------------------------------------

MARKER = "PHIBUILD_REMOTE_CODE_RAN"


def model_with_code(directory: Path) -> Path:
    """phi3-tiny with an ``auto_map`` pointing at Python files of its own, which leave a mark if run (the model's
    in a file of its own: it needs torch, which a toolchain that only reads the config, as mlx's, does not have)."""
    model = copy_model("phi3-tiny", directory)
    mark = directory.parent / "ran"
    code = (f"import pathlib\npathlib.Path({str(mark)!r}).write_text('ran')\n"
            "from transformers.models.phi3.configuration_phi3 import Phi3Config as MyConfig  # noqa\n")
    (model / "my_phi.py").write_text(code)
    (model / "my_phi_model.py").write_text(
        "from transformers.models.phi3.modeling_phi3 import Phi3ForCausalLM as MyModel  # noqa\n")
    rewrite_json(model / "config.json", lambda c: c.update(
        auto_map={"AutoConfig": "my_phi.MyConfig", "AutoModelForCausalLM": "my_phi_model.MyModel"}))
    return model


@pytest.mark.parametrize("backend", ["onnx", "openvino", "mlx"])
def test_no_code_from_a_model_directory_runs_or_ships_without_the_opt_in(tmp_path, backend):
    model = model_with_code(tmp_path / "model")
    root = write_project(tmp_path / "p", ["a"], [backend], ["fp32"], local={"a": model})
    run = run_doit(root)
    assert run.code == 0, run.output
    assert not (tmp_path / "ran").exists(), "the model's own code ran"
    artifact = root / "build" / f"a-fp32-{backend}"
    assert not list(artifact.rglob("*.py"))
    assert not [p for p in artifact.rglob("*.json") if "auto_map" in p.read_text()]
    assert "my_phi.py" not in {f for f in Lockfile(root / "artifacts.lock").get(f"a-fp32-{backend}").files}


def test_the_opt_in_keys_and_ships_the_models_code(tmp_path):
    model = model_with_code(tmp_path / "model")
    root = write_project(tmp_path / "p", ["a"], ["mlx"], ["fp32"],
                         extra=f'[tool.phibuild.model.a]\npath = "{model}"\ntrust_remote_code = true\n')
    run = run_doit(root)
    assert run.code == 0, run.output
    entry = Lockfile(root / "artifacts.lock").get("a-fp32-mlx")
    assert entry.parts.trust_remote_code and "my_phi.py" in entry.files
    plain = write_project(tmp_path / "q", ["a"], ["mlx"], ["fp32"], local={"a": model})
    assert run_doit(plain).code == 0
    assert Lockfile(plain / "artifacts.lock").get("a-fp32-mlx").key != entry.key



def test_a_runtime_that_fails_the_smoke_check_is_one_line(tmp_path):
    """OpenVINO's CPU plugin with its kernels capped at SSE4.1 cannot run an int4 LLM (PagedAttention refuses):
    the target fails with one line saying which check failed, and nothing is published."""
    root = write_project(tmp_path, ["phi3-tiny"], ["openvino"], ["int4"])
    env = {**os.environ, "OV_CPU_MAX_ISA": "SSE41", "ONEDNN_MAX_CPU_ISA": "SSE41"}
    process = doit_process(root, env=env)
    output = process.communicate(timeout=600)[0]
    assert process.returncode != 0
    assert "phi3-tiny-int4-openvino: the smoke check in OpenVINO's runtime failed: RuntimeError:" in output, output
    no_traceback(output)
    assert not list((root / ".phibuild").glob("objects/*/*"))
