"""OpenVINO IR of Phi-4-multimodal, transformers' native ``Phi4MultimodalForCausalLM``, through optimum-intel's
``image-text-to-text`` export: one IR per part (language model, text embeddings, vision embeddings and projection,
the audio parts) and the tokenizer IRs, as ``optimum-cli export openvino --task image-text-to-text`` writes them.

Weights follow the Phi cookbook's vision recipe as optimum-intel applies a weight format to a multimodal model
(``optimum-cli export openvino --task image-text-to-text --weight-format int4 ...``): the language model is
compressed with the target's parameters (int4 defaults: INT4_SYM, groups of 64, ratio
0.6), every other part to INT8_SYM per channel; fp16 stores every part in f16 (the language model keeping its
rotary constants in f32, as for the text models); fp32 is the export as it is.

Two things in optimum-intel 2.2.0 stop the export under transformers 5, and ``_export_patches`` changes both for
the export alone: it exports this model type only under transformers <= 4.53.3 (the cap is lifted to the
installed version, which the key holds), and its replacement of the vision encoder's forward asks the encoder
for its hidden states, which transformers 5 gathers with hooks that do not fire inside the replacement (the
replacement here runs the layers itself, with an explicit bidirectional mask). Measured on phi4-multimodal-tiny:
the fp32 IR's logits on an image prompt are transformers' to 1e-5; a build in a fresh process and one after
other exports give the same bytes (``_rewrite`` renumbers counter-made names in every IR).

openvino_genai's VLMPipeline (2026.4) runs this layout under the hub's model type, ``phi4mm``, and refuses the
name ``phi4_multimodal``; the smoke check opens the artifact through a directory of links whose config.json says
``phi4mm`` (the IR's inputs and outputs are the ones that path reads).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
import types
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .. import SMOKE_IMAGE, SMOKE_QUESTION, SMOKE_TOKENS, Job, Runtime, Smoke, replaced
from .ir import FP16, FP16_ROTARY, TITLE, export, rewrite, weight_config

TASK = "image-text-to-text"
LANGUAGE = "openvino_language_model"
# What VLMPipeline reads; the audio parts are exported too, and compressed like the vision parts.
IRS = (LANGUAGE, "openvino_text_embeddings_model", "openvino_vision_embeddings_model",
       "openvino_vision_projection_model", "openvino_tokenizer", "openvino_detokenizer")
GENAI_MODEL_TYPE = "phi4mm"


def build(job: Job) -> None:
    """Export, then compress and renumber each IR (``openvino._rewrite``). As for the text models, int4 and int8
    are exported at the checkpoint's dtype before NNCF compresses them (at Phi-4-multimodal's size, float32 would
    hold 22 GB), fp16 and fp32 in float32."""
    from optimum.intel import OVWeightQuantizationConfig

    weights = weight_config(job.precision, job.params)
    export(job, TASK, weights, _export_patches(), IRS)
    output = job.output
    parts = {path.stem: None for path in sorted(output.glob("openvino_*_model.xml"))}
    if weights is not None:
        others = OVWeightQuantizationConfig(bits=8, sym=True, group_size=-1, ratio=1.0)
        steps = {stem: weights if stem == LANGUAGE else others for stem in parts}
    elif job.precision == "fp16":
        steps = {stem: FP16_ROTARY if stem == LANGUAGE else FP16 for stem in parts}
    else:
        steps = parts
    rewrite(output, {**steps, "openvino_tokenizer": None, "openvino_detokenizer": None}, weights is not None)


def smoke(artifact: Path, job: Job) -> Smoke:
    """Generate with openvino_genai.VLMPipeline from a chat prompt with the image phibuild ships."""
    import numpy as np
    import openvino
    import openvino_genai
    from PIL import Image

    class Collected(openvino_genai.StreamerBase):
        """The ids the pipeline generates, as it streams them."""

        def __init__(self):
            super().__init__()
            self.ids: list[int] = []

        def write(self, token):
            self.ids += [int(token)] if isinstance(token, int) else [int(t) for t in token]
            return openvino_genai.StreamingStatus.RUNNING

        def end(self):
            pass

    with _as_genai_model(artifact) as directory, Image.open(SMOKE_IMAGE) as picture:
        pipeline = openvino_genai.VLMPipeline(str(directory), "CPU")
        image = openvino.Tensor(np.array(picture.convert("RGB"), dtype=np.uint8)[None])
        config = openvino_genai.GenerationConfig(max_new_tokens=SMOKE_TOKENS, do_sample=False)
        collected = Collected()
        result = pipeline.generate(f"<|image_1|>{SMOKE_QUESTION}", images=[image], generation_config=config,
                                   streamer=collected)
        prompt = result.perf_metrics.get_num_input_tokens()
    return Smoke.generated(f"{TITLE} GenAI", collected.ids, result.texts[0],
                           f", with {SMOKE_IMAGE.name} ({prompt} prompt tokens, image included)")


def image_logits(artifact: Path, job: Job) -> Any:
    """The last position's logits of the image prompt, with the CPU plugin in f32 (its default on a CPU with bf16
    arithmetic is bf16)."""
    runtime = VisionRuntime(artifact, {"INFERENCE_PRECISION_HINT": "f32"})
    return runtime.forward(runtime.prompt)[-1]


class VisionRuntime(Runtime):
    """The artifact in optimum-intel's OVModelForVisualCausalLM, its text after the image prompt."""

    def __init__(self, artifact: Path, settings: dict[str, str] | None = None):
        import openvino
        from optimum.intel import OVModelForVisualCausalLM
        from transformers import AutoProcessor

        from .. import image_prompt

        self.prompt = image_prompt.inputs(AutoProcessor.from_pretrained(artifact))
        self.model = OVModelForVisualCausalLM.from_pretrained(artifact, local_files_only=True, ov_config=settings)
        precision = (settings or {}).get("INFERENCE_PRECISION_HINT") or openvino.Core().get_property(
            "CPU", "INFERENCE_PRECISION_HINT").to_string()
        self.settings = (f"OpenVINO CPU plugin, inference precision {precision}, after an image prompt of "
                         f"{self.prompt['input_ids'].shape[1]} tokens")

    def forward(self, inputs: Any) -> Any:
        """Logits at every position of ``inputs`` (the processor's tensors), float32."""
        import numpy as np
        import torch

        with torch.no_grad():
            return np.asarray(self.model(**inputs).logits[0], dtype=np.float32)

    def logits(self, ids: Sequence[int]) -> Any:
        from .. import image_prompt

        return self.forward(image_prompt.followed_by(self.prompt, ids))[self.prompt["input_ids"].shape[1]:]

    def decode(self, ids: Sequence[int], count: int) -> float:
        """optimum-intel's generate after the image prompt and ``ids``, timed from its first token to its last by
        the times it streams them (transformers' streamer protocol: the prompt, then each token)."""
        from .. import image_prompt

        class Clock:
            def __init__(self):
                self.times: list[float] = []

            def put(self, value):
                self.times.append(time.perf_counter())

            def end(self):
                pass

        clock = Clock()
        self.model.generate(**image_prompt.followed_by(self.prompt, ids), max_new_tokens=count + 1,
                            min_new_tokens=count + 1, do_sample=False, streamer=clock)
        return count / (clock.times[-1] - clock.times[1])


@contextlib.contextmanager
def _as_genai_model(artifact: Path) -> Iterator[Path]:
    """A directory of links to ``artifact``'s files, with a config.json naming the model type VLMPipeline knows."""
    with tempfile.TemporaryDirectory(prefix="phibuild-genai-") as scratch:
        directory = Path(scratch)
        for path in artifact.iterdir():
            if path.name != "config.json":
                os.symlink(path.resolve(), directory / path.name)
        config = json.loads((artifact / "config.json").read_text(encoding="utf-8"))
        config["model_type"] = GENAI_MODEL_TYPE
        (directory / "config.json").write_text(json.dumps(config), encoding="utf-8")
        yield directory


@contextlib.contextmanager
def _export_patches() -> Iterator[None]:
    """optimum-intel's Phi-4-multimodal export, made to run under the installed transformers 5 (module docstring)."""
    import transformers
    from optimum.exporters.openvino import model_configs, model_patcher

    patcher = model_patcher.Phi4MMVisionEmbeddingsPatcher
    their_enter = patcher.__enter__

    def enter(self):
        their_enter(self)
        encoder = self._model.img_processor
        encoder.forward = types.MethodType(_vision_forward, encoder)  # their __exit__ puts _orig_forward back
        return self

    with replaced(model_configs.Phi4MMOpenVINOConfig, MAX_TRANSFORMERS_VERSION=transformers.__version__), \
            replaced(patcher, __enter__=enter):
        yield


def _vision_forward(self, pixel_values, patch_attention_mask=None, position_ids=None, **kwargs):
    """The SigLIP encoder's forward returning every layer's hidden states, as transformers 4 did."""
    import torch
    from transformers.modeling_attn_mask_utils import _prepare_4d_attention_mask
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    batch, patch = pixel_values.size(0), self.config.patch_size
    if patch_attention_mask is None:
        patch_attention_mask = torch.ones((batch, pixel_values.size(2) // patch, pixel_values.size(3) // patch),
                                          dtype=torch.bool, device=pixel_values.device)
    hidden = self.embeddings(pixel_values=pixel_values, patch_attention_mask=patch_attention_mask,
                             position_ids=position_ids)
    # Always an explicit mask: transformers 5 drops an all-ones one, and its vision attention is marked causal.
    mask = _prepare_4d_attention_mask(patch_attention_mask.view(batch, -1), hidden.dtype)
    states = [hidden]
    for layer in self.encoder.layers:
        hidden = layer(hidden, mask)
        states.append(hidden)
    return BaseModelOutputWithPooling(last_hidden_state=self.post_layernorm(hidden), hidden_states=tuple(states))
