"""The multimodal contract, one for every backend that builds the embedded vision look-alike
(phi4-multimodal-tiny, transformers' native Phi4MultimodalForCausalLM): ``doit quantize`` builds it and smoke-checks
it with the image phibuild ships, its logits on the image prompt are transformers' within the precision's
tolerance, and a rebuild gives the same bytes. Every backend that cannot build it says why in ``doit list``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import lock_of, run_doit, write_project

from phibuild import build
from phibuild.backends import MODULES, SMOKE_IMAGE, SMOKE_TOKENS, Job, get, image_prompt
from phibuild.catalog import EMBEDDED_DIR, EMBEDDED_VISION, ModelSpec
from phibuild.errors import UnsupportedError
from phibuild.project import Project, Target
from phibuild.release import CARD

MODEL = "phi4-multimodal-tiny"
SOURCE = EMBEDDED_DIR / MODEL
BACKENDS = [name for name in MODULES if "Phi4MultimodalForCausalLM" in get(name).architectures]
PRECISIONS = ["fp32", "fp16", "int8", "int4"]
# Every precision each backend's runtime runs on this CPU (ONNX fp16 is built for CUDA).
TARGETS = [(backend, precision) for backend in BACKENDS for precision in PRECISIONS
           if get(backend).params(precision, {}, vision=True).get("execution_provider", "cpu") == "cpu"]
FP32_ATOL = 1e-3  # measured: 3e-6 (OpenVINO), 6e-5 (ONNX); float32 kernels differ a little between CPUs
# nats, KL(transformers || artifact) of the next token after the image prompt; measured at int4: 4e-4 (OpenVINO),
# 2e-3 (ONNX). Another image moves transformers' own distribution many times further (image_effect).
QUANTIZED_KL = 5e-3
CLEAR = 0.25  # a greedy choice ahead by more than this (in logits) is clear whatever the runtime's precision


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A project in which every vision target of every precision was built by one `doit quantize` run."""
    root = write_project(tmp_path_factory.mktemp("vision"), [MODEL], BACKENDS, PRECISIONS)
    run = run_doit(root, "quantize")
    assert run.code == 0, run.output
    return root


@pytest.fixture(scope="module")
def transformers_model():
    """The source in float32 transformers with eager attention: with SDPA, transformers 5.5's vision encoder runs
    causally on a crop without padding (its attention is marked causal and an all-ones mask is dropped), which no
    runtime does."""
    import torch
    from transformers import AutoModelForCausalLM, AutoProcessor

    processor = AutoProcessor.from_pretrained(SOURCE)
    model = AutoModelForCausalLM.from_pretrained(SOURCE, dtype=torch.float32, attn_implementation="eager")
    return processor, model


def logits_after(transformers_model, image: Path = SMOKE_IMAGE, ids: tuple[int, ...] = ()) -> np.ndarray:
    """transformers' logits at the image prompt's last position and at each of ``ids`` after it."""
    import torch

    processor, model = transformers_model
    prompt = image_prompt.inputs(processor, image)
    with torch.no_grad():
        logits = model(**image_prompt.followed_by(prompt, ids)).logits[0].numpy()
    return logits[prompt["input_ids"].shape[1] - 1:]


@pytest.fixture(scope="module")
def reference(transformers_model) -> np.ndarray:
    processor, model = transformers_model
    prompt = image_prompt.inputs(processor)
    assert int((prompt["input_ids"] == model.config.vision_config.image_token_id).sum()) > 256  # global view, tiles
    return logits_after(transformers_model)[-1]


@pytest.fixture(scope="module")
def image_effect(transformers_model, reference, tmp_path_factory) -> float:
    """How far transformers' own next-token distribution moves when the picture is black instead (the same size,
    so the same crops and tokens): roughly what a runtime that lost the image would be off by."""
    from PIL import Image

    black = tmp_path_factory.mktemp("image") / "black.png"
    with Image.open(SMOKE_IMAGE) as picture:
        Image.new("RGB", picture.size).save(black)
    return kl(reference, logits_after(transformers_model, black)[-1])


def kl(reference: np.ndarray, logits: np.ndarray) -> float:
    """KL(reference || artifact) of the next-token distributions, in nats."""
    p = np.exp(reference - reference.max())
    p /= p.sum()
    log_q = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    return float((p * (np.log(p) - log_q)).sum())


@pytest.mark.parametrize(("backend", "precision"), TARGETS)
def test_built_and_smoke_checked_with_the_image(built, backend, precision):
    name = f"{MODEL}-{precision}-{backend}"
    entry = lock_of(built)[name]
    smoke = entry["smoke"]["result"]
    assert re.match(rf"ok: {SMOKE_TOKENS} tokens from a Phi chat prompt: .*, with {SMOKE_IMAGE.name} \(\d+ prompt "
                    r"tokens", smoke, re.DOTALL), smoke
    prompt_tokens = int(re.search(r"\((\d+) prompt tokens", smoke)[1])
    assert prompt_tokens > 256 + 8  # the image's tokens were in the prompt, not only the question's
    assert set(entry["files"]) == {p.name for p in (built / "build" / name).iterdir()}


@pytest.mark.parametrize(("backend", "precision"), TARGETS)
def test_image_logits_match_transformers(built, reference, image_effect, backend, precision):
    artifact = built / "build" / f"{MODEL}-{precision}-{backend}"
    logits = get(backend).image_logits(artifact, Job(SOURCE, artifact, precision, {}, vision=True))
    assert logits.shape == reference.shape
    if precision == "fp32":
        np.testing.assert_allclose(logits, reference, rtol=0, atol=FP32_ATOL)
    else:
        assert kl(reference, logits) <= min(QUANTIZED_KL, image_effect / 5), (kl(reference, logits), image_effect)


@pytest.mark.parametrize("backend", BACKENDS)
def test_smoke_check_picks_what_transformers_does(built, transformers_model, backend):
    """Each token the runtime's own pipeline generates from the image prompt (fp32 artifact, the runtime's default
    precision) is transformers' greedy choice after the same tokens, wherever that choice is clear."""
    artifact = built / "build" / f"{MODEL}-fp32-{backend}"
    params = get(backend).params("fp32", {}, vision=True)
    smoke = get(backend).smoke(artifact, Job(SOURCE, artifact, "fp32", params, vision=True))
    assert smoke.ran and len(smoke.tokens) == SMOKE_TOKENS
    expected = logits_after(transformers_model, ids=smoke.tokens[:-1])
    for position, (token, logits) in enumerate(zip(smoke.tokens, expected, strict=True)):
        first, second = np.sort(logits)[-2:][::-1]
        if first - second > CLEAR:
            assert token == int(logits.argmax()), f"token {position}: {token}, transformers picks {logits.argmax()}"


@pytest.mark.parametrize(("backend", "precision"), TARGETS)
def test_rebuild_gives_identical_bytes(built, backend, precision):
    """Built again from scratch in this process, after the other exports, into the same files as the lock's."""
    run = run_doit(built, f"reproduce:{MODEL}-{precision}-{backend}")
    assert run.code == 0, run.output
    assert f"{MODEL}-{precision}-{backend}: reproducible" in run.output


@pytest.mark.parametrize(("backend", "precision"), TARGETS)
def test_fidelity_is_measured_after_the_image_prompt(built, backend, precision):
    """The fidelity step measures the text that follows the image prompt, in the runtime's defaults, and gates it."""
    name = f"{MODEL}-{precision}-{backend}"
    run = run_doit(built, f"fidelity:{name}")
    assert run.code == 0, run.output
    record = lock_of(built)[name]["fidelity"]
    assert "after an image prompt of" in record["runtime"], record
    assert record["tokens"] == 2048 and 0 <= record["kl"] <= get_gate(built, precision)


def get_gate(root: Path, precision: str) -> float:
    return Project.load(root).config.gate(precision)["kl"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_released_card_says_how_to_run_it_with_an_image_and_its_snippet_runs(built, backend, tmp_path):
    from huggingface_hub import ModelCard

    name = f"{MODEL}-int4-{backend}"
    if not (built / "release" / name).is_dir():
        assert run_doit(built, "release").code == 0
    text = (built / "release" / name / CARD).read_text()
    assert ModelCard(text).data.pipeline_tag == "image-text-to-text"
    snippet = text.split("```python\n", 1)[1].split("```", 1)[0]
    copy = tmp_path / "copy"
    shutil.copytree(built / "release" / name, copy)
    shutil.copy(SMOKE_IMAGE, copy / "image.png")
    ran = subprocess.run([sys.executable, "-c", snippet], cwd=copy, capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert ran.stdout.strip(), "the snippet generated nothing"


def test_every_other_backend_says_why_it_cannot(tmp_path):
    """`doit list` leaves out what no backend can build here, each with a reason of its own (not the generic
    "builds X, not Y"): the look-alike on gguf and mlx, the hub's own-code layouts everywhere."""
    models = [*EMBEDDED_VISION, "phi35-vision", "phi4-multimodal"]
    root = write_project(tmp_path, models, list(MODULES), PRECISIONS)
    found, left_out = Project.load(root).targets()
    assert {(t.model.name, t.backend.name, t.precision) for t in found} == {
        (MODEL, backend, precision) for backend in BACKENDS for precision in PRECISIONS}
    assert len(left_out) == len(models) * len(MODULES) * len(PRECISIONS) - len(found)
    listed = run_doit(root, "list")
    assert listed.code == 0
    for item in left_out:
        assert " builds " not in item.reason, item
        assert f"{item.backend}: {item.reason}" in listed.output


def test_a_hub_model_of_ones_own_that_reads_images_is_refused_once_downloaded(tmp_path):
    """Its defaults and its fidelity step are chosen before it is downloaded, as for a text model: refused, with what
    to do instead, not built as one."""
    project = Project.load(write_project(tmp_path, ["phi3-tiny"], ["onnx"], ["int4"]))
    target = Target(ModelSpec("mine", repo="me/mine"), "int4", get("onnx"), get("onnx").params("int4", {}))
    with pytest.raises(UnsupportedError, match=r"reads images.*\[tool\.phibuild\.model\.mine\] path = "):
        build._check_source(project, target, SOURCE)
