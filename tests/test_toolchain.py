"""What a cache key says about the software that built an artifact: complete by mechanism, checked at every
build, pinned for installs (constraints.txt), and comparable with a lock made on another machine."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO, lock_of, run_doit, write_project

from phibuild.backends import MODULES, get, platform_tag
from phibuild.environment import Environment, imports_outside
from phibuild.lockfile import Lockfile
from phibuild.project import Project


def test_a_toolchain_is_the_closure_of_its_backends_extra(tmp_path):
    environment = Environment()
    toolchains = {name: environment.toolchain(name, get(name).extra, get(name).optional_imports) for name in MODULES}
    assert {"openvino", "nncf", "optimum-intel", "openvino-tokenizers", "tiktoken", "transformers", "tokenizers",
            "torch", "numpy"} <= set(toolchains["openvino"].packages)  # tiktoken: openvino-tokenizers[transformers]
    onnx = set(toolchains["onnx"].packages)
    assert {"onnxruntime-genai", "onnxruntime", "onnx-ir", "torch", "sympy", "jmespath"} <= onnx
    assert {"llama-cpp-python", "gguf", "numpy", "sentencepiece"} <= set(toolchains["gguf"].packages)
    assert {"mlx", "mlx-lm", "transformers", "tokenizers"} <= set(toolchains["mlx"].packages)
    assert not {"openvino", "llama-cpp-python", "mlx"} & set(toolchains["onnx"].packages)
    assert not {"torch", "transformers", "onnx"} & set(toolchains["gguf"].packages)
    for toolchain in toolchains.values():
        assert toolchain.python == f"cpython-{sys.version_info.major}.{sys.version_info.minor}"
        assert "phibuild" not in toolchain.packages and "pytest" not in toolchain.packages


BUILD_THAT_IMPORTS = """
    import sys
    from pathlib import Path
    from phibuild import tasks
    from phibuild.backends.gguf import GgufBackend

    real = GgufBackend.build_intermediate

    def build_intermediate(self, job):
        {import_}
        real(self, job)

    GgufBackend.build_intermediate = build_intermediate
    sys.exit(tasks.run(Path({root!r})))
"""
OPTIONAL_IMPORT = """try:
            import xmltodict  # noqa: F401
            found = "found"
        except ImportError:
            found = "none"
        Path({marker!r}).write_text(found)"""


def build_importing(root, import_: str) -> subprocess.CompletedProcess:
    """Build ``root`` in a fresh process (so that the import is new), the GGUF conversion running
    ``import_`` first; xmltodict is installed, and nothing the gguf extra requires pulls it in."""
    script = textwrap.dedent(BUILD_THAT_IMPORTS.format(import_=import_, root=str(root)))
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)


def test_a_build_that_needs_a_distribution_its_key_does_not_cover_fails_and_names_it(tmp_path):
    root = write_project(tmp_path, ["phi3-tiny"], ["gguf"], ["fp16"])
    run = build_importing(root, "import xmltodict  # noqa: F401")
    assert run.returncode != 0, run.stdout + run.stderr
    assert re.search(r"phi3-tiny-gguf-f16: the build needs xmltodict, which its cache key does not cover",
                     run.stdout), run.stdout + run.stderr
    assert "[tool.phibuild.key_packages] gguf = ['xmltodict']" in run.stdout
    assert not (root / "artifacts.lock").exists()
    assert not list((root / ".phibuild").glob("objects/*/*"))


@pytest.mark.parametrize("covered", [False, True], ids=["uncovered", "in-key_packages"])
def test_an_optional_import_sees_only_what_the_key_covers(tmp_path, covered):
    """What a toolchain would pick up because it happens to be installed (httpcore finds trio, tabulate
    wcwidth) is hidden from the build, so the same key means the same software on every machine."""
    extra = '[tool.phibuild.key_packages]\ngguf = ["xmltodict"]\n' if covered else ""
    root = write_project(tmp_path, ["phi3-tiny"], ["gguf"], ["fp16"], extra=extra)
    marker = tmp_path / "found"
    run = build_importing(root, OPTIONAL_IMPORT.format(marker=str(marker)))
    assert run.returncode == 0, run.stdout + run.stderr
    assert marker.read_text() == ("found" if covered else "none")
    assert ("xmltodict" in lock_of(root)["phi3-tiny-fp16-gguf"]["versions"]) is covered


def test_the_check_after_a_build_names_an_import_that_slipped_past():
    """The net behind the hiding (a namespace package shared with a covered distribution cannot be hidden)."""
    toolchain = Environment().toolchain("gguf", get("gguf").extra)
    before = {name for name in sys.modules if name.partition(".")[0] != "xmltodict"}
    import xmltodict  # noqa: F401

    assert "xmltodict" in imports_outside(before, toolchain)


def test_the_toolchain_cache_holds_across_runs_that_change_the_project_directory(tmp_path, monkeypatch):
    """A no-op must not re-read every distribution's metadata: doit puts the project directory on sys.path and
    each run's .doit.db changes its mtime, which must not make the cached toolchains stale."""
    from phibuild import environment

    cache = tmp_path / ".phibuild" / "toolchains.json"
    monkeypatch.syspath_prepend(str(tmp_path))
    first = Environment(cache).toolchain("gguf", get("gguf").extra, ("xmltodict",))
    (tmp_path / ".doit.db").write_text("a later run")

    def walk(*args):
        raise AssertionError("the toolchain was computed again")

    monkeypatch.setattr(environment, "_walk", walk)
    assert Environment(cache).toolchain("gguf", get("gguf").extra, ("xmltodict",)) == first


def test_key_packages_extend_a_toolchain(tmp_path):
    extended = write_project(tmp_path / "extended", ["phi3-tiny"], ["gguf"], ["fp16"],
                             extra='[tool.phibuild.key_packages]\ngguf = ["xmltodict"]\n')
    plain = write_project(tmp_path / "plain", ["phi3-tiny"], ["gguf"], ["fp16"])
    assert "xmltodict" in Project.load(extended).toolchain(get("gguf")).packages
    assert "xmltodict" not in Project.load(plain).toolchain(get("gguf")).packages


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


def committed_constraints() -> dict[str, str]:
    here = f'sys_platform == "{sys.platform}"'
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.startswith("#") or not line.strip() or here not in line:
            continue
        name, version = line.split(";")[0].strip().split("==")
        pins[name] = version
    return pins


def test_the_committed_constraints_pin_the_versions_the_committed_lock_records():
    pins = committed_constraints()
    for name, entry in Lockfile(REPO / "artifacts.lock").read().artifacts.items():
        if entry.parts.machine["platform"] != platform_tag():
            continue
        wrong = {package: (version, pins.get(package)) for package, version in entry.parts.toolchain.packages.items()
                 if pins.get(package) != version}
        assert not wrong, f"{name}: constraints.txt does not pin {wrong}"


def test_this_environment_is_the_one_the_constraints_describe(tmp_path):
    """What the README's install commands (through constraints.txt) must give: exactly the pinned versions.
    `doit constraints` run here writes the committed file again."""
    committed = (REPO / "constraints.txt").read_text()
    root = write_project(tmp_path, ["phi3-tiny"], ["gguf"], ["int4"])
    (root / "constraints.txt").write_text(committed)
    run = run_doit(root, "constraints")
    assert run.code == 0, run.output
    assert (root / "constraints.txt").read_text() == committed, "installed versions differ from constraints.txt"


@pytest.mark.parametrize("backend", list(MODULES))
def test_every_committed_entry_of_a_backend_was_built_with_one_toolchain(backend):
    entries = [entry for entry in lock_of(REPO).values() if entry["backend"] == backend]
    assert entries, f"artifacts.lock has no {backend} entries"
    assert len({entry["toolchain"] for entry in entries}) == 1
