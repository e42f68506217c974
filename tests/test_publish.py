"""``doit publish`` against the loopback fake hub, through the real huggingface_hub client: one repository and one
commit per artifact, nothing committed twice, and an upload that fails commits nothing."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from conftest import copy_model, run_doit, use_endpoint, write_project
from fakehub import FakeHub

from phibuild.lockfile import Lockfile

PUBLISH = '[tool.phibuild.publish]\nrepo = "me/{target}"\nprivate = true\n'


@pytest.fixture
def built(tmp_path: Path) -> Path:
    model = copy_model("phi3-tiny", tmp_path / "model")
    root = write_project(tmp_path / "p", ["a"], ["gguf", "onnx"], ["int4"], local={"a": model}, extra=PUBLISH)
    assert run_doit(root).code == 0
    return root


@pytest.fixture
def writable_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    with FakeHub() as server:
        use_endpoint(server.url, tmp_path / "hf", monkeypatch, HF_TOKEN="hf_test", HF_HUB_DISABLE_XET="1")
        yield server


def test_publish_commits_each_artifact_once_and_then_nothing(built, writable_hub):
    run = run_doit(built, "publish")
    assert run.code == 0, run.output
    assert "2 artifacts committed, 0 already published" in run.output
    lock = Lockfile(built / "artifacts.lock").read().artifacts
    for target in ("a-int4-gguf", "a-int4-onnx"):
        repo = f"me/{target}"
        assert writable_hub.private[repo]
        assert writable_hub.commit_count(repo) == 2  # the repository's creation, and the artifact
        files = writable_hub.files(repo)
        for name, want in lock[target].files.items():
            assert hashlib.sha256(files[name]).hexdigest() == want.sha256
        assert files["README.md"] == (built / "release" / target / "MODEL_CARD.md").read_bytes()
        assert set(files) == {*lock[target].files, "README.md", ".gitattributes"}

    again = run_doit(built, "publish")
    assert again.code == 0, again.output
    assert "0 artifacts committed, 2 already published" in again.output
    assert all(writable_hub.commit_count(f"me/{t}") == 2 for t in ("a-int4-gguf", "a-int4-onnx"))


def test_a_changed_artifact_is_one_new_commit_that_replaces_its_files(built, writable_hub):
    assert run_doit(built, "publish").code == 0
    write_project(built, ["a"], ["gguf", "onnx"], ["int4"], local={"a": built.parent / "model"},
                  extra=PUBLISH + '[tool.phibuild.params.gguf.int4]\ntype = "Q4_0"\n')
    assert run_doit(built).code == 0
    run = run_doit(built, "publish")
    assert run.code == 0, run.output
    assert "1 artifacts committed, 1 already published" in run.output
    assert writable_hub.commit_count("me/a-int4-gguf") == 3
    model = writable_hub.files("me/a-int4-gguf")["model.gguf"]
    assert hashlib.sha256(model).hexdigest() == Lockfile(built / "artifacts.lock").get("a-int4-gguf").files[
        "model.gguf"].sha256


def test_an_upload_that_fails_commits_nothing(built, writable_hub):
    writable_hub.refuse_uploads = True
    run = run_doit(built, "publish")
    assert run.code != 0
    assert "publishing a-int4-gguf to me/a-int4-gguf failed: " in run.output
    assert "Traceback" not in run.output
    assert writable_hub.commit_count("me/a-int4-gguf") == 1  # created, nothing committed


def test_publish_needs_its_settings(tmp_path):
    root = write_project(tmp_path, ["phi3-tiny"], ["gguf"], ["int4"])
    run = run_doit(root, "publish")
    assert run.code != 0 and 'doit publish needs [tool.phibuild.publish] repo = "you/{target}"' in run.output
