"""ONNX Runtime GenAI: its model builder (``onnxruntime_genai.models.builder``), run in-process.

int4 and int8 are weight-only MatMulNBits quantization (block size, symmetry, algorithm and accuracy level
as parameters), done one weight at a time (quantize.py): the builder's own bytes, without its float32
copy of the whole model in memory. fp32 runs on the CPU execution provider; fp16 targets CUDA or DirectML, so
it is built here but its smoke check cannot run on a CPU-only machine and says so.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .. import (
    SMOKE_MESSAGES,
    SMOKE_TOKENS,
    Backend,
    CannotRun,
    Job,
    Runtime,
    Smoke,
)
from .builder import TITLE, run_builder

# Which execution providers the builder accepts for each precision (shared/phi-family.md).
PROVIDERS = {
    "int4": ("cpu", "cuda", "dml", "webgpu"),
    "int8": ("cpu", "cuda", "webgpu"),
    "fp16": ("cuda", "dml"),
    "fp32": ("cpu", "cuda"),
}
ALGORITHMS = ("default", "rtn", "k_quant")  # the builder's int4_algo_config choices
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # MatMulNBits: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations
QUANTIZED = {"execution_provider": "cpu", "block_size": 32, "is_symmetric": True, "algo_config": "default",
             "accuracy_level": 4}


class OnnxBackend(Backend):
    name = "onnx"
    title = TITLE
    toolchain = "onnx"
    architectures = frozenset({"Phi3ForCausalLM", "Phi3SmallForCausalLM", "PhiMoEForCausalLM",
                               "Phi4MultimodalForCausalLM"})  # vision.py
    # The builder makes only the text decoder of these; their image encoders are exported by the repositories' own
    # scripts, for their own code (phibuild exports the native Phi4MultimodalForCausalLM's: vision.py).
    unsupported = dict.fromkeys(("Phi3VForCausalLM", "Phi4MMForCausalLM"),
                                "the builder makes only its text decoder, and phibuild exports the image encoder "
                                "of the native Phi4MultimodalForCausalLM layout only")
    # onnx.load refuses external data that is a hardlink or symlink (its guard against path tricks).
    unlinkable = ("*.onnx.data",)
    precisions = {
        "int4": dict(QUANTIZED),
        "int8": dict(QUANTIZED),
        "fp16": {"execution_provider": "cuda"},
        "fp32": {"execution_provider": "cpu"},
    }

    def check_params(self, precision: str, params: dict[str, Any]) -> str | None:
        provider = params["execution_provider"]
        if provider not in PROVIDERS[precision]:
            return (f"{self.title} builds {precision} for execution providers {', '.join(PROVIDERS[precision])}, "
                    f"not {provider!r}")
        if "block_size" not in params:
            return None
        if params["block_size"] not in (16, 32, 64, 128, 256):
            return f"block_size must be 16, 32, 64, 128 or 256, not {params['block_size']!r}"
        if not isinstance(params["is_symmetric"], bool):
            return f"is_symmetric must be true or false, not {params['is_symmetric']!r}"
        if params["algo_config"] not in ALGORITHMS:
            return f"algo_config must be one of {', '.join(ALGORITHMS)}, not {params['algo_config']!r}"
        if params["accuracy_level"] not in ACCURACY_LEVELS:
            return f"accuracy_level must be one of 0, 1, 2, 3, 4, not {params['accuracy_level']!r}"
        return None

    def refuse_architecture(self, architecture: str, precision: str, params: dict[str, Any],
                            packages: dict[str, str]) -> str | None:
        if architecture == "PhiMoEForCausalLM" and (precision, params["execution_provider"]) != ("int4", "cuda"):
            return "its PhiMoE operator is CUDA-only: int4 with execution_provider = \"cuda\""
        return None

    def build(self, job: Job) -> None:
        if job.vision:
            from . import vision

            return vision.build(job)
        return run_builder(job, job.source)

    def smoke(self, artifact: Path, job: Job) -> Smoke:
        provider = job.params["execution_provider"]
        if provider != "cpu":
            return Smoke(False, f"built for the {provider} execution provider; this check runs on the CPU only")
        if job.vision:
            from . import vision

            return vision.smoke(artifact, job)
        import onnxruntime_genai as og

        model = og.Model(str(artifact))
        tokenizer = og.Tokenizer(model)
        prompt = tokenizer.apply_chat_template(json.dumps(SMOKE_MESSAGES), add_generation_prompt=True)
        prompt_ids = tokenizer.encode(prompt)
        search = og.GeneratorParams(model)
        search.set_search_options(max_length=len(prompt_ids) + SMOKE_TOKENS, do_sample=False)
        generator = og.Generator(model, search)
        generator.append_tokens(prompt_ids)
        tokens = []
        while not generator.is_done():
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        return Smoke.generated(self.title, tokens, tokenizer.decode(tokens))

    def runtime(self, artifact: Path, job: Job) -> Runtime:
        provider = job.params["execution_provider"]
        if provider != "cpu":
            raise CannotRun(f"built for the {provider} execution provider; this machine runs the CPU one only")
        if job.vision:
            from .vision import VisionRuntime

            return VisionRuntime(artifact)
        import onnxruntime_genai as og

        return GenaiRuntime(og.Model(str(artifact)))

    def image_logits(self, artifact: Path, job: Job) -> Any:
        from . import vision

        return vision.image_logits(artifact, job)


class GenaiRuntime(Runtime):
    """onnxruntime-genai's generator: the prompt's logits, as it computes them before the first token."""

    settings = "onnxruntime-genai, CPU execution provider"

    def __init__(self, model):
        self.model = model

    def logits(self, ids):
        import numpy as np
        import onnxruntime_genai as og

        search = og.GeneratorParams(self.model)
        search.set_search_options(max_length=len(ids) + 1)
        generator = og.Generator(self.model, search)
        generator.append_tokens(list(ids))
        return np.asarray(generator.get_output("logits"), dtype=np.float32)[0]

    def decode(self, ids, count):
        import onnxruntime_genai as og

        search = og.GeneratorParams(self.model)
        total = len(ids) + count + 1
        search.set_search_options(max_length=total, min_length=total)  # no early end of text
        generator = og.Generator(self.model, search)
        generator.append_tokens(list(ids))
        generator.generate_next_token()  # picks the first token from the prompt's logits: no model run
        start = time.perf_counter()
        for _ in range(count):
            generator.generate_next_token()
        return count / (time.perf_counter() - start)


BACKEND = OnnxBackend


BACKEND = OnnxBackend
