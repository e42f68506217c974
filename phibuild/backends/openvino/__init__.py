"""OpenVINO IR through optimum-intel's exporter, with weights compressed by NNCF, run in-process.

The export is the one ``optimum-cli export openvino --task text-generation-with-past`` runs (``main_export``): a
stateful ``openvino_model.xml``/``.bin`` plus ``openvino_tokenizer``/``openvino_detokenizer`` IR from
openvino-tokenizers and the Hugging Face config and tokenizer files. fp32 and fp16 are the exported weights as
they are (fp16 is stored as f16 and decompressed on load, except the constants the rotary angles are computed
from: see ``_fp16_keeping_rotary``). int4 and int8 are weight-only compression, as the
CLI does it: the model is exported at its checkpoint dtype, then ``nncf.compress_weights`` runs with the
arguments optimum-intel's ``OVWeightQuantizationConfig`` makes of our parameters. int4 is data-free: with
``ratio`` < 1 NNCF ranks the MatMuls by weight quantization error, compresses the most tolerant ones to int4
(groups of ``group_size``) and the rest, embeddings and the last MatMul (unless ``all_layers``) to
``backup_precision``; ``awq`` adds data-free AWQ. int8 is per-channel (INT8_ASYM, or INT8_SYM with ``sym``).

Reproducible (measured with OpenVINO 2026.4.1 and NNCF 3.4.0 on one x86 CPU): a key built again gives
byte-identical files, in a fresh process or after other exports in the same one, on one core or two, from a
copy of the source elsewhere. The IR records no paths or times, only versions, and those are in the key.
Two things made the bytes vary, and the build removes both: OpenVINO names unnamed nodes after a process-wide
counter, so the XML depended on what the process had done before (``_rewrite`` renumbers those names in
graph order); and optimum's ``openvino_config.json`` names the directory it exported from (the CLI writes
the source path there), so it is not written. Not verified: other CPU generations. NNCF computes the
compressed weights with OpenVINO CPU kernels, so int4/int8 ``.bin`` files might differ between instruction
sets. Compared with ``optimum-cli export openvino --weight-format int4 --sym --group-size 128 --ratio 0.6``,
an int4 build has the same ``.bin`` files, tokenizer and config files; its model XML differs in counter-made
names and lacks optimum's ``optimum/nncf_version`` entry.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import (
    SMOKE_MESSAGES,
    SMOKE_TOKENS,
    Backend,
    Job,
    Runtime,
    Smoke,
    cpu_flags,
)
from .ir import FP16_ROTARY, IRS, TASK, TITLE, export, reference_rope, rewrite, weight_config

BACKUP_PRECISIONS = ("int8_asym", "int8_sym", "none")
BF16_FLAGS = {"avx512_bf16", "amx_bf16"}  # what makes the CPU plugin execute in bf16 by default
# optimum-intel 2.2.0 exports the hub's multimodal layouts with their own code, and only under transformers
# <= 4.53.3; phibuild lifts that cap for the native layout alone, whose export it has verified.
REMOTE_VISION = "optimum-intel exports this own-code layout only under transformers <= 4.53.3 (phibuild's: 5.5)"

class OpenvinoBackend(Backend):
    name = "openvino"
    title = TITLE
    toolchain = "openvino"
    # Phi-3.5-MoE's hub config says PhiMoE (its remote code); transformers writes Phimoe for the same model.
    architectures = frozenset({"Phi3ForCausalLM", "PhiMoEForCausalLM", "PhimoeForCausalLM",
                               "Phi4MultimodalForCausalLM"})  # vision.py
    recipe = 2  # 2: fp16 keeps the rotary constants in f32
    # int4 defaults are the Phi Cookbook's OpenVINO recipe (optimum-cli --weight-format int4 --sym
    # --group-size 128 --ratio 0.6). optimum-intel's own default for Phi-3.5/4-mini, applied by model id, is
    # sym = false, group_size = 64, ratio = 1.0, awq = true (data-free AWQ).
    precisions = {
        "int4": {"sym": True, "group_size": 128, "ratio": 0.6, "backup_precision": "int8_asym",
                 "all_layers": False, "awq": False},
        "int8": {"sym": False},
        "fp16": {},
        "fp32": {},
    }

    # The cookbook's vision recipe: INT4_SYM in groups of 64 for the language model.
    vision_defaults = {"int4": {"group_size": 64}}

    unsupported = {
        "Phi3SmallForCausalLM": "optimum-intel has no OpenVINO export for Phi-3-small (build it with onnx)",
        **dict.fromkeys(("Phi3VForCausalLM", "Phi4MMForCausalLM"), REMOTE_VISION),
    }

    def check_params(self, precision: str, params: dict[str, Any]) -> str | None:
        flags = [name for name in ("sym", "all_layers", "awq") if not isinstance(params.get(name, False), bool)]
        if flags:
            return f"{', '.join(flags)} must be true or false"
        if precision == "int4":
            group_size = params["group_size"]
            if not isinstance(group_size, int) or isinstance(group_size, bool) or not (group_size == -1
                                                                                      or group_size > 0):
                return f"group_size must be a positive integer, or -1 for one group per channel, not {group_size!r}"
            ratio = params["ratio"]
            if not isinstance(ratio, int | float) or isinstance(ratio, bool) or not 0 < ratio <= 1:
                return f"ratio (the share of weights in int4) must be in (0, 1], not {ratio!r}"
            if params["backup_precision"] not in BACKUP_PRECISIONS:
                return (f"backup_precision must be one of {', '.join(BACKUP_PRECISIONS)}, "
                        f"not {params['backup_precision']!r}")
        return None

    def build(self, job: Job) -> None:
        if job.vision:
            from . import vision

            return vision.build(job)
        weights = weight_config(job.precision, job.params)
        export(job, TASK, weights, reference_rope(), IRS)
        steps = dict.fromkeys(IRS)
        steps["openvino_model"] = weights or (FP16_ROTARY if job.precision == "fp16" else None)
        rewrite(job.output, steps, bool(weights))

    def smoke(self, artifact: Path, job: Job) -> Smoke:
        """Generate with openvino_genai.LLMPipeline, the runtime an OpenVINO IR LLM is deployed with (a multimodal
        model: VLMPipeline, in vision.py).

        It reads the exported tokenizer/detokenizer IR and the chat template they carry, so the check
        covers everything the artifact ships, not only the model IR (OVModelForCausalLM would use the
        Hugging Face tokenizer instead).
        """
        if job.vision:
            from . import vision

            return vision.smoke(artifact, job)
        import openvino_genai

        pipeline = openvino_genai.LLMPipeline(str(artifact), "CPU")
        tokenizer = pipeline.get_tokenizer()
        prompt = tokenizer.apply_chat_template(SMOKE_MESSAGES, add_generation_prompt=True)
        # The template writes any special tokens itself, as transformers' apply_chat_template(tokenize=True).
        inputs = tokenizer.encode(prompt, add_special_tokens=False)
        config = openvino_genai.GenerationConfig(max_new_tokens=SMOKE_TOKENS, do_sample=False)
        tokens = tuple(int(token) for token in pipeline.generate(inputs, config).tokens[0])
        return Smoke.generated(self.title, tokens, tokenizer.decode(list(tokens)))

    def image_logits(self, artifact: Path, job: Job) -> Any:
        from . import vision

        return vision.image_logits(artifact, job)

    def runtime(self, artifact: Path, job: Job) -> Runtime:
        if job.vision:
            from .vision import VisionRuntime

            return VisionRuntime(artifact)
        import openvino

        return OpenvinoRuntime(openvino.Core().compile_model(artifact / "openvino_model.xml", "CPU"))

    def runtime_machine(self, facts: Callable[[], dict[str, str]]) -> dict[str, str]:
        """The CPU plugin executes in bf16 by default where the processor has bf16 arithmetic."""
        found = sorted(cpu_flags() & BF16_FLAGS)
        return {"bf16": ",".join(found) or "none"}


class OpenvinoRuntime(Runtime):
    """The stateful model IR compiled for the CPU with the plugin's defaults, as openvino_genai runs it."""

    def __init__(self, compiled):
        self.compiled = compiled
        precision, cache = (compiled.get_property(name).to_string()
                            for name in ("INFERENCE_PRECISION_HINT", "KV_CACHE_PRECISION"))
        self.settings = f"OpenVINO CPU plugin, its defaults: inference precision {precision}, KV cache {cache}"

    def logits(self, ids):
        import numpy as np

        request = self.compiled.create_infer_request()
        return np.asarray(request.infer(_inputs(ids, 0))["logits"][0], dtype=np.float32)

    def decode(self, ids, count):
        """The loop openvino_genai runs: the prompt, then one token at a time on the request's KV state."""
        request = self.compiled.create_infer_request()
        token = int(request.infer(_inputs(ids, 0))["logits"][0, -1].argmax())
        start = time.perf_counter()
        for step in range(count):
            token = int(request.infer(_inputs([token], len(ids) + step))["logits"][0, -1].argmax())
        return count / (time.perf_counter() - start)


def _inputs(ids, past: int) -> dict:
    """The stateful model's inputs for ``ids`` following ``past`` tokens already in its KV state."""
    import numpy as np

    n = len(ids)
    return {"input_ids": np.array([ids], dtype=np.int64), "attention_mask": np.ones((1, past + n), dtype=np.int64),
            "position_ids": np.arange(past, past + n, dtype=np.int64)[None], "beam_idx": np.zeros(1, dtype=np.int32)}


BACKEND = OpenvinoBackend


BACKEND = OpenvinoBackend
