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

from phibuild.backends import MODULES, SMOKE_IMAGE, SMOKE_QUESTION, SMOKE_TOKENS, Job, get
from phibuild.catalog import EMBEDDED_DIR, EMBEDDED_VISION
from phibuild.project import Project
from phibuild.release import CARD

MODEL = "phi4-multimodal-tiny"
SOURCE = EMBEDDED_DIR / MODEL
BACKENDS = [name for name in MODULES if "Phi4MultimodalForCausalLM" in get(name).architectures]
PRECISIONS = ["fp32", "int4"]
TARGETS = [(backend, precision) for backend in BACKENDS for precision in PRECISIONS]
FP32_ATOL = 1e-3  # measured: 3e-6 (OpenVINO), 6e-5 (ONNX); float32 kernels differ a little between CPUs
INT4_KL = 0.02  # nats, the reference's next-token distribution against the artifact's; measured 4e-4 (OpenVINO),
# 2e-3 (ONNX)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A project in which every vision target of TARGETS was built by one `doit quantize` run."""
    root = write_project(tmp_path_factory.mktemp("vision"), [MODEL], BACKENDS, PRECISIONS)
    run = run_doit(root, *(f"quantize:{MODEL}-{precision}-{backend}" for backend, precision in TARGETS))
    assert run.code == 0, run.output
    return root


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    """transformers' float32 next-token logits after the image prompt. Eager attention: with SDPA, transformers
    5.5's vision encoder runs causally on a crop without padding (its attention is marked causal and an all-ones
    mask is dropped), which no runtime does."""
    import torch
    from PIL import Image
    from transformers import AutoModelForCausalLM, AutoProcessor

    processor = AutoProcessor.from_pretrained(SOURCE)
    model = AutoModelForCausalLM.from_pretrained(SOURCE, dtype=torch.float32, attn_implementation="eager")
    text = processor.tokenizer.apply_chat_template([{"role": "user", "content": f"<|image|>{SMOKE_QUESTION}"}],
                                                   add_generation_prompt=True, tokenize=False)
    inputs = processor(text=text, images=[Image.open(SMOKE_IMAGE)], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.vision_config.image_token_id).sum()) > 256  # global view, tiles
    with torch.no_grad():
        return model(**inputs).logits[0, -1].numpy()


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
def test_image_logits_match_transformers(built, reference, backend, precision):
    artifact = built / "build" / f"{MODEL}-{precision}-{backend}"
    logits = get(backend).image_logits(artifact, Job(SOURCE, artifact, precision, {}, vision=True))
    assert logits.shape == reference.shape
    if precision == "fp32":
        np.testing.assert_allclose(logits, reference, rtol=0, atol=FP32_ATOL)
    else:
        assert kl(reference, logits) <= INT4_KL


@pytest.mark.parametrize("backend", BACKENDS)
def test_rebuild_gives_identical_bytes(built, backend):
    """Built again from scratch in this process, after the other exports, into the same files as the lock's."""
    run = run_doit(built, f"reproduce:{MODEL}-int4-{backend}")
    assert run.code == 0, run.output
    assert f"{MODEL}-int4-{backend}: reproducible" in run.output


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
    """The backends that build no vision target, and the hub's own-code layouts everywhere, are left out with a
    reason of their own (not the generic "builds X, not Y")."""
    models = [*EMBEDDED_VISION, "phi35-vision", "phi4-multimodal"]
    root = write_project(tmp_path, models, list(MODULES), PRECISIONS)
    found, left_out = Project.load(root).targets()
    assert {(t.model.name, t.backend.name, t.precision) for t in found} == {(MODEL, b, p) for b, p in TARGETS}
    assert len(left_out) == len(models) * len(MODULES) * len(PRECISIONS) - len(TARGETS)
    for item in left_out:
        assert " builds " not in item.reason, item
