"""Toolchains: each backend's software is an environment of its own, made from a committed, hashed lock and run
as a worker process. What a key says about that software (the lock's digest), how environments are made
(atomically, named by digest, from the places pip installs from), and how a worker fails (one message)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, lock_of, run_doit, write_project

from phibuild.backends import MODULES, get, platform_tag
from phibuild.errors import BuildError, ConfigError
from phibuild.lockfile import Lockfile
from phibuild.project import Project
from phibuild.toolchains import chosen, declare, environment, pipconfig, worker


def test_every_toolchain_has_a_hashed_lock_for_this_machine():
    for name in declare.NAMES:
        locked = declare.locked(name)
        text = locked.path.read_text()
        pins = re.findall(r"^[a-z0-9][a-z0-9._-]*==\S+", text, re.M)
        assert len(pins) == len(locked.packages) > 0
        hashed = re.findall(r"^[a-z0-9][a-z0-9._-]*==\S+[^\n]*\\\n(?:\s+--hash=sha256:[0-9a-f]{64}[ \\]*\n)+",
                            text, re.M)
        assert len(hashed) == len(pins), f"{name}: a package without its sha256"
    packages = {name: set(declare.locked(name).packages) for name in declare.NAMES}
    assert {"onnxruntime-genai", "onnxruntime", "onnx-ir", "torch", "transformers"} <= packages["onnx"]
    assert {"llama-cpp-python", "gguf", "numpy"} <= packages["gguf"]
    assert {"openvino", "nncf", "optimum-intel", "openvino-genai", "openvino-tokenizers"} <= packages["openvino"]
    assert {"mlx", "mlx-lm", "transformers"} <= packages["mlx"]
    assert not {"torch", "transformers", "onnx"} & packages["gguf"]  # each toolchain holds what it needs alone
    assert not {"torch", "openvino", "onnxruntime"} & packages["mlx"]
    for backend in MODULES:  # every backend names one
        assert get(backend).toolchain in declare.NAMES


def test_the_key_names_the_toolchains_lock(tmp_path):
    root = write_project(tmp_path, ["phi3-tiny"], ["onnx", "gguf"], ["int4"])
    project = Project.load(root)
    for target in project.targets()[0]:
        toolchain = project.plan(target).parts.toolchain
        locked = declare.locked(target.backend.toolchain)
        assert toolchain.lock == locked.digest and toolchain.packages == locked.packages
        assert toolchain.python == declare.python_tag()


def test_changing_one_toolchains_lock_makes_only_its_targets_stale(tmp_path, monkeypatch):
    root = write_project(tmp_path, ["phi3-tiny"], ["mlx", "gguf"], ["int4"])
    before = Project.load(root)
    keys = {t.name: before.plan(t).key for t in before.targets()[0]}
    old_parts = before.plan(before.target("phi3-tiny-int4-mlx")).parts
    original = declare.locked
    real = original("mlx")
    edited = declare.Locked(real.name, real.path, "0" * 64, {**real.packages, "mlx-lm": "9.9.9"})
    monkeypatch.setattr(chosen, "locked", lambda name: edited if name == "mlx" else original(name))
    project = Project.load(root)
    after = {t.name: project.plan(t).key for t in project.targets()[0]}
    assert after["phi3-tiny-int4-gguf"] == keys["phi3-tiny-int4-gguf"]
    assert after["phi3-tiny-int4-mlx"] != keys["phi3-tiny-int4-mlx"]
    changes = project.plan(project.target("phi3-tiny-int4-mlx")).parts.differences(old_parts)
    assert f"versions: mlx-lm {real.packages['mlx-lm']} -> 9.9.9" in changes


def test_a_lock_that_is_no_lock_is_one_line():
    with pytest.raises(ConfigError, match="pins no package"):
        declare.packages("# nothing here\n", "x.txt")
    with pytest.raises(ConfigError, match="pins torch twice"):
        declare.packages("torch==2.1 \\\ntorch==2.2 \\\n", "x.txt")
    with pytest.raises(ConfigError, match="is not a PEP 440 version"):
        declare.packages("torch==2.1;rm \\\n", "x.txt")
    with pytest.raises(ConfigError, match="no toolchain"):
        declare.locked("../../etc")


def test_pips_configuration_reaches_uv(tmp_path):
    home = tmp_path / "home"
    (home / ".config" / "pip").mkdir(parents=True)
    (home / ".config" / "pip" / "pip.conf").write_text(
        "[global]\nindex-url = https://mirror.example/simple\nextra-index-url = file:///a file:///b\n"
        "cert = /etc/ca.pem\n[install]\ntrusted-host = mirror.example\n")
    config = pipconfig.read({"HOME": str(home), "XDG_CONFIG_DIRS": str(tmp_path / "none"),
                             "PIP_FIND_LINKS": "/opt/w1 /opt/w2"})
    args = config.uv_arguments()
    assert args[args.index("--index-url") + 1] == "https://mirror.example/simple"
    assert [args[i + 1] for i, a in enumerate(args) if a == "--extra-index-url"] == ["file:///a", "file:///b"]
    assert [args[i + 1] for i, a in enumerate(args) if a == "--find-links"] == ["/opt/w1", "/opt/w2"]
    assert "--allow-insecure-host" in args and "unsafe-best-match" in args
    assert config.uv_environment() == {"SSL_CERT_FILE": "/etc/ca.pem"}
    assert pipconfig.read({"HOME": str(home), "PIP_CONFIG_FILE": os.devnull}).uv_arguments() == [
        "--index-strategy", "unsafe-best-match"]


def test_an_environment_is_made_once_atomically_and_named_by_its_lock(tmp_path, monkeypatch):
    """The gguf toolchain made in an empty place (uv's cache makes it quick): complete when it appears, named by
    the digest, reused; a stranger's directory under its name is never replaced."""
    monkeypatch.setenv("PHIBUILD_TOOLCHAINS", str(tmp_path / "envs"))
    locked = declare.locked("gguf")
    place = environment.ensure(locked)
    assert place == tmp_path / "envs" / locked.environment_name
    assert json.loads((place / environment.MARK).read_text())["lock"] == locked.digest
    assert [p.name for p in (tmp_path / "envs").iterdir() if not p.name.endswith(".lock")] == [place.name]
    installed = worker.call(environment.python(place), [{"verb": "inventory", "failure": "inventory"}],
                            "inventory")[0]["packages"]
    assert {name: installed[name] for name in locked.packages} == locked.packages
    assert environment.ensure(locked) == place
    environment.remove(place)
    stranger = tmp_path / "envs" / locked.environment_name
    stranger.mkdir()
    (stranger / "mine.txt").write_text("a user's")
    with pytest.raises(BuildError, match="does not remove what it did not make"):
        environment.ensure(locked)
    with pytest.raises(BuildError, match="is not a phibuild toolchain environment"):
        environment.remove(stranger)
    assert (stranger / "mine.txt").read_text() == "a user's"


def test_a_lock_the_index_cannot_satisfy_is_one_message_naming_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("PHIBUILD_TOOLCHAINS", str(tmp_path / "envs"))
    lock = tmp_path / "bad.txt"
    lock.write_text("no-such-package-phibuild==9.9.9 \\\n    --hash=sha256:" + "0" * 64 + "\n")
    locked = declare.Locked("gguf", lock, "1" * 64, {"no-such-package-phibuild": "9.9.9"})
    with pytest.raises(BuildError, match="no-such-package-phibuild") as failed:
        environment.ensure(locked)
    assert "\n" not in str(failed.value)
    assert not list((tmp_path / "envs").glob("gguf-*")), "a failed creation left an environment"


def test_a_worker_killed_by_a_signal_is_one_message(tmp_path):
    crashing = tmp_path / "python"
    crashing.write_text("#!/bin/sh\necho 'the toolchain said this'\nkill -SEGV $$\n")
    crashing.chmod(0o755)
    with pytest.raises(BuildError, match=r"^x-int4-gguf: llama.cpp failed: the worker was killed by SIGSEGV"):
        worker.call(crashing, [{"verb": "inventory", "failure": "x"}], "x-int4-gguf: llama.cpp failed")


def test_a_worker_sees_phibuild_and_its_toolchain_alone():
    """Not the test's environment (pytest, doit, xxhash), not the checkout's directory."""
    place = environment.ensure(declare.locked("gguf"))
    probe = ("import importlib.util, sys, phibuild; print(phibuild.__file__); "
             "print([m for m in ('pytest', 'doit', 'xxhash', 'tests', 'torch') if importlib.util.find_spec(m)])")
    run = subprocess.run([str(environment.python(place)), "-I", "-c", worker.BOOTSTRAP.replace(
        "from phibuild import work\nsys.exit(work.main(job))\n", probe), str(worker.PACKAGE), "unused"],
        capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [str(worker.PACKAGE / "__init__.py"), "[]"]


def test_the_gguf_key_carries_the_quantizer_fingerprint_where_the_quantizer_runs(tmp_path):
    root = write_project(tmp_path, ["phi3-tiny"], ["gguf"], ["int4", "int8", "fp16", "fp32"])
    project = Project.load(root)
    machines = {target.precision: project.plan(target).parts.machine for target in project.targets()[0]}
    assert machines["int4"]["quantizer"] == machines["int8"]["quantizer"]
    assert re.fullmatch(r"[0-9a-f]{32}", machines["int4"]["quantizer"])
    assert "quantizer" not in machines["fp16"] and "quantizer" not in machines["fp32"]  # the conversion itself
    assert all(machine["platform"] == platform_tag() for machine in machines.values())


def test_reproduce_compares_with_a_lock_made_elsewhere_file_by_file(tmp_path):
    root = write_project(tmp_path, ["phi3-tiny"], ["gguf"], ["int4"])
    assert run_doit(root).code == 0
    elsewhere = (root / "artifacts.lock").read_text()
    (root / "same.lock").write_text(elsewhere)
    entry = Lockfile(root / "artifacts.lock").get("phi3-tiny-int4-gguf")
    (root / "other.lock").write_text(elsewhere.replace(entry.files["model.gguf"].sha256, "0" * 64))
    same = run_doit(root, "reproduce:phi3-tiny-int4-gguf", "--lock", "same.lock")
    assert same.code == 0 and "reproducible (every file identical to same.lock)" in same.output, same.output
    other = run_doit(root, "reproduce:phi3-tiny-int4-gguf", "--lock", "other.lock")
    assert other.code != 0
    assert "phi3-tiny-int4-gguf: NOT reproducible: model.gguf: rebuilt " in other.output
    assert "locked " in other.output and "sha256 0000000000000000" in other.output


@pytest.mark.parametrize("backend", list(MODULES))
def test_every_committed_entry_of_a_backend_was_built_with_its_toolchains_lock(backend):
    entries = {name: entry for name, entry in lock_of(REPO).items() if entry["backend"] == backend}
    assert entries, f"artifacts.lock has no {backend} entries"
    assert len({entry["toolchain"] for entry in entries.values()}) == 1
    toolchain = Lockfile(REPO / "artifacts.lock").read().artifacts[next(iter(entries))].parts.toolchain
    assert toolchain.lock == declare.locked(get(backend).toolchain).digest


def test_doit_toolchains_makes_and_checks_every_environment_the_project_uses(tmp_path):
    root = write_project(tmp_path, ["phi3-tiny"], ["gguf", "mlx"], ["int4"])
    run = run_doit(root, "toolchains")
    assert run.code == 0, run.output
    for name in ("gguf", "mlx", "fidelity"):
        assert re.search(rf"toolchain {name}: \S+, {len(declare.locked(name).packages)} packages as locked", run.output)
    assert "toolchain onnx" not in run.output


def test_the_test_process_never_imported_a_toolchain_to_plan(tmp_path):
    """doit's side plans every backend's targets without importing any toolchain."""
    root = write_project(tmp_path, ["phi3-tiny"], list(MODULES), ["int4"])
    code = ("import sys, pathlib; from phibuild.project import Project; p = Project.load(pathlib.Path(sys.argv[1])); "
            "[p.plan(t) for t in p.targets()[0]]; "
            "print(sorted(m for m in ('torch', 'transformers', 'onnxruntime', 'openvino', 'mlx', 'llama_cpp', "
            "'gguf', 'numpy') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_a_worker_result_that_is_not_one_per_step_is_refused(tmp_path):
    liar = tmp_path / "python"
    liar.write_text('#!/bin/sh\necho \'{"results": [1, 2, 3]}\' > "$5/result.json"\n')
    liar.chmod(0o755)
    with pytest.raises(BuildError, match="not one result per step"):
        worker.call(liar, [{"verb": "inventory", "failure": "x"}], "x")
    Path(tmp_path / "python").write_text('#!/bin/sh\nhead -c 70000000 /dev/zero > "$5/result.json"\n')
    with pytest.raises(BuildError, match="cannot be read"):
        worker.call(liar, [{"verb": "inventory", "failure": "x"}], "x")


def test_gc_removes_environments_no_lock_names_and_nothing_else(tmp_path, monkeypatch):
    envs = tmp_path / "envs"
    monkeypatch.setenv("PHIBUILD_TOOLCHAINS", str(envs))
    old = envs / "gguf-0000000000000000"
    old.mkdir(parents=True)
    (old / environment.MARK).write_text("{}")
    crashed = envs / f"{environment.CREATING}gguf-0000000000000000-999999999-abcd"
    crashed.mkdir()
    stranger = envs / "gguf-1111111111111111"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("a user's")
    current = envs / declare.locked("mlx").environment_name
    current.mkdir()
    (current / environment.MARK).write_text("{}")
    root = write_project(tmp_path / "p", ["phi3-tiny"], ["gguf"], ["int4"])
    listed = run_doit(root, "gc")
    assert listed.code == 0 and old.exists() and f"would remove toolchain environment {old}" in listed.output
    removed = run_doit(root, "gc", "--delete")
    assert removed.code == 0, removed.output
    assert not old.exists() and not crashed.exists()
    assert (stranger / "notes.txt").read_text() == "a user's" and current.exists()


def own_environment(tmp_path: Path, crash_on: str | None = None) -> Path:
    """An interpreter of "the user's own": the gguf environment behind a wrapper script, which kills itself
    with SIGSEGV on a job with a step ``crash_on`` (as llama.cpp's AMX kernels crash a process)."""
    real = environment.python(environment.ensure(declare.locked("gguf")))
    script = tmp_path / "own-python"
    crash = f'if grep -q \'"verb": "{crash_on}"\' "$5/job.json"; then kill -SEGV $$; fi\n' if crash_on else ""
    script.write_text(f"#!/bin/sh\n{crash}exec {real} \"$@\"\n")
    script.chmod(0o755)
    return script


def test_an_environment_of_ones_own_is_keyed_by_what_it_holds(tmp_path):
    own = own_environment(tmp_path)
    root = write_project(tmp_path / "p", ["phi3-tiny"], ["gguf"], ["int4"],
                         extra=f'[tool.phibuild.toolchains]\ngguf = "{own}"\n')
    project = Project.load(root)
    toolchain = project.toolchain(get("gguf"))
    assert toolchain.packages == declare.locked("gguf").packages  # the same packages, held elsewhere
    assert toolchain.lock != declare.locked("gguf").digest  # named by what it holds, not by phibuild's lock
    run = run_doit(root)
    assert run.code == 0, run.output
    managed = write_project(tmp_path / "m", ["phi3-tiny"], ["gguf"], ["int4"])
    assert run_doit(managed).code == 0
    assert lock_of(root)["phi3-tiny-int4-gguf"]["files"] == lock_of(managed)["phi3-tiny-int4-gguf"]["files"]


@pytest.mark.parametrize("setting", ["relative/python", "/opt/../etc/python", 3])
def test_an_own_environment_setting_is_checked(tmp_path, setting):
    value = f'"{setting}"' if isinstance(setting, str) else setting
    root = write_project(tmp_path / "p", ["phi3-tiny"], ["gguf"], ["int4"],
                         extra=f"[tool.phibuild.toolchains]\ngguf = {value}\n")
    run = run_doit(root, "list")
    assert run.code != 0 and "[tool.phibuild].toolchains" in run.output, run.output
    unknown = write_project(tmp_path / "q", ["phi3-tiny"], ["gguf"], ["int4"],
                            extra='[tool.phibuild.toolchains]\ngguff = "/usr/bin/python3"\n')
    assert "'gguff' is not a toolchain (did you mean 'gguf'?)" in run_doit(unknown, "list").output


def test_a_toolchain_that_crashes_fails_its_target_with_one_message_and_the_others_build(tmp_path):
    own = own_environment(tmp_path, crash_on="build")
    root = write_project(tmp_path / "p", ["phi3-tiny"], ["gguf", "mlx"], ["int4"],
                         extra=f'[tool.phibuild.toolchains]\ngguf = "{own}"\n')
    run = run_doit(root, "--continue", "quantize")
    assert run.code != 0
    assert "phi3-tiny-int4-gguf: llama.cpp GGUF failed: the worker was killed by SIGSEGV (signal 11)" in run.output
    assert "Traceback" not in run.output
    assert set(lock_of(root)) == {"phi3-tiny-int4-mlx"}


def test_the_workers_side_needs_nothing_but_the_standard_library():
    """What a worker imports of phibuild (the worker, every backend module, the fidelity computations) loads in an
    interpreter without site-packages: a toolchain's environment holds no phibuild dependency (xxhash, doit)."""
    modules = ["phibuild.work", "phibuild.measuring", *MODULES.values()]
    probe = "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules)
    run = subprocess.run([sys.executable, "-I", "-S", "-c", worker.BOOTSTRAP.replace(
        "from phibuild import work\nsys.exit(work.main(job))\n", probe), str(worker.PACKAGE), "unused"],
        capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_every_relative_import_in_phibuild_names_something_that_exists():
    """Including those inside functions, which the worker's side runs only where a toolchain is: a module moved
    into a package must not leave one of them pointing at nothing."""
    import ast
    import importlib
    import importlib.util

    missing = []
    for path in sorted(worker.PACKAGE.rglob("*.py")):
        package = path.relative_to(worker.PACKAGE.parent).with_suffix("").parts[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or not node.level:
                continue
            base = ".".join(package[: len(package) - node.level + 1])
            if node.module:
                if importlib.util.find_spec(f"{base}.{node.module}") is None:
                    missing.append(f"{path.name}:{node.lineno} {base}.{node.module}")
                continue
            for alias in node.names:
                if (importlib.util.find_spec(f"{base}.{alias.name}") is None
                        and not hasattr(importlib.import_module(base), alias.name)):
                    missing.append(f"{path.name}:{node.lineno} {base}.{alias.name}")
    assert not missing


def test_a_backend_whose_toolchain_cannot_run_here_is_said_in_the_task_list(tmp_path):
    root = write_project(tmp_path / "p", ["phi3-tiny"], ["gguf", "mlx"], ["int4"],
                         extra='[tool.phibuild.toolchains]\ngguf = "/nonexistent/bin/python"\n')
    run = run_doit(root, "list")
    assert run.code == 0, run.output
    assert ("cannot run here: gguf ([tool.phibuild.toolchains] gguf = '/nonexistent/bin/python' is not an "
            "interpreter)") in run.output
    assert "quantize:phi3-tiny-int4-mlx" in run.output and "quantize:phi3-tiny-int4-gguf" not in run.output
