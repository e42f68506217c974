"""A sharded checkpoint, as the hub ships its models (``model-0000N-of-0000M.safetensors`` and
``model.safetensors.index.json``), builds on every backend into the very bytes its single-file twin builds.

phi35-tiny split into two shards, the tensors in another order than the original file's: one doit run builds
both at int4 through every backend, and each pair of artifacts is compared file by file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import copy_model, lock_of, run_doit, write_project
from safetensors.torch import load_file, save_file

from phibuild.backends import MODULES


def shard(model: Path, parts: int = 2) -> None:
    """Replace ``model``'s model.safetensors by ``parts`` shards and their index, as transformers writes them."""
    tensors = load_file(model / "model.safetensors")
    names = sorted(tensors, reverse=True)  # not the single file's order: nothing may depend on it
    (model / "model.safetensors").unlink()
    weight_map = {}
    for index in range(parts):
        file = f"model-{index + 1:05d}-of-{parts:05d}.safetensors"
        chosen = names[index::parts]
        save_file({name: tensors[name] for name in chosen}, model / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(chosen, file)
    total = sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
    (model / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sharded")
    whole = copy_model("phi35-tiny", root / "models" / "whole")
    split = copy_model("phi35-tiny", root / "models" / "split")
    shard(split)
    write_project(root, ["whole", "split"], list(MODULES), ["int4"], local={"whole": whole, "split": split})
    run = run_doit(root)
    assert run.code == 0, run.output
    return root


@pytest.mark.parametrize("backend", list(MODULES))
def test_a_sharded_source_builds_the_same_bytes_as_one_file(built, backend):
    lock = lock_of(built)
    whole, split = lock[f"whole-int4-{backend}"], lock[f"split-int4-{backend}"]
    assert split["source"] != whole["source"] and split["key"] != whole["key"]  # two sources, two keys
    assert split["files"] == whole["files"]  # every file, byte for byte (sha256 and size)
    assert sorted(path.name for path in (built / "models" / "split").glob("*.safetensors")) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
