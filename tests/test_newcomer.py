"""The path a new user takes: a project with the Quick start's settings (every catalog model, every backend,
the embedded INT4 ONNX model as the default), on a machine without network. One build, reused by each test."""

from __future__ import annotations

import contextlib
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
from conftest import run_doit

SETTINGS = '[tool.phibuild]\ndefault = ["phi35-tiny-int4-onnx"]\n'  # as the repository's own pyproject.toml


@contextlib.contextmanager
def offline() -> Iterator[mock.MagicMock]:
    """No network: every connection fails as on a machine without one; the mock counts the attempts."""
    with mock.patch.object(socket.socket, "connect", side_effect=OSError(101, "Network is unreachable")) as connect:
        yield connect


@pytest.fixture(scope="module")
def quick_start(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("quick-start")
    (root / "pyproject.toml").write_text(SETTINGS)
    with offline() as connect:
        run = run_doit(root)
    assert run.code == 0, run.output
    assert connect.call_count == 0
    return root


def test_the_headline_command_is_a_task_that_fails_only_for_want_of_network(quick_start):
    with offline():
        run = run_doit(quick_start, "quantize:phi35-int4-onnx")
    assert run.code != 0
    assert "Invalid parameter" not in run.output and "Traceback" not in run.output
    assert ("phibuild: cannot fetch phi35 (microsoft/Phi-3.5-mini-instruct) from the Hugging Face hub: "
            in run.output), run.output
    assert "Check the network" in run.output


def test_listing_checking_and_explaining_hub_targets_touch_no_network(quick_start):
    with offline() as connect:
        listed = run_doit(quick_start, "list")
        again = run_doit(quick_start)
        info = run_doit(quick_start, "info", "quantize:phi35-int4-onnx")
    assert connect.call_count == 0
    assert listed.code == 0 and "quantize:phi35-int4-onnx " in listed.output
    assert "quantize:phi4-mini-int8-gguf " in listed.output
    assert again.code == 0 and "\n.  " not in "\n" + again.output  # doit marks a task it runs with ".  "
    assert ("not built yet; building it downloads microsoft/Phi-3.5-mini-instruct at revision main (resolved to a "
            "commit and pinned when built, about 8 GB: 3.8 billion parameters in bfloat16)") in info.output
    assert "(args=[], kwargs={})" not in info.output


def test_verify_and_release_act_on_what_was_built_and_sum_up_the_rest(quick_start):
    verify = run_doit(quick_start, "verify")
    assert verify.code == 0, verify.output
    assert "verify: all 1 artifacts built here match artifacts.lock" in verify.output
    release = run_doit(quick_start, "release")
    assert release.code == 0, release.output
    assert (quick_start / "release" / "phi35-tiny-int4-onnx" / "MODEL_CARD.md").is_file()
    for said in (verify.output, release.output):
        lines = [line for line in said.splitlines() if "configured targets are not built here" in line]
        assert len(lines) == 1, said
        assert "`doit quantize` builds them" in lines[0] and len(lines[0]) < 200


def test_release_names_every_artifact_it_cannot_release_at_once(quick_start, tmp_path):
    root = tmp_path / "named"
    root.mkdir()
    shutil.copy(quick_start / "artifacts.lock", root / "artifacts.lock")
    names = ["phi35-tiny-int4-onnx", "phi3-tiny-int4-onnx", "phi4-mini-tiny-int8-gguf"]
    (root / "pyproject.toml").write_text(
        f'{SETTINGS}store = "{quick_start / ".phibuild"}"\nrelease = {names!r}\n'.replace("'", '"'))
    run = run_doit(root, "release")
    assert run.code != 0
    assert ("cannot release 2 artifacts that are not built here: phi3-tiny-int4-onnx, phi4-mini-tiny-int8-gguf; "
            "build them with: doit quantize:phi3-tiny-int4-onnx quantize:phi4-mini-tiny-int8-gguf") in run.output
    assert not (root / "release").exists()
