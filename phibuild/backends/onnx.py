"""ONNX Runtime GenAI: its model builder (``onnxruntime_genai.models.builder``), run in-process.

int4 and int8 are weight-only MatMulNBits quantization (block size, symmetry, algorithm and accuracy level
as parameters); fp32 runs on the CPU execution provider; fp16 targets CUDA or DirectML, so it is built here
but its smoke check cannot run on a CPU-only machine and says so.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from ..errors import BuildError
from . import SMOKE_MESSAGES, SMOKE_TOKENS, TRANSFORMERS_OPTIONAL, Backend, Job, Smoke, console_kept

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
    title = "ONNX Runtime GenAI"
    extra = "onnx"
    optional_imports = TRANSFORMERS_OPTIONAL
    architectures = frozenset({"Phi3ForCausalLM", "Phi3SmallForCausalLM", "PhiMoEForCausalLM"})
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

    def refuse_architecture(self, architecture: str, precision: str, params: dict[str, Any]) -> str | None:
        if architecture == "PhiMoEForCausalLM" and (precision, params["execution_provider"]) != ("int4", "cuda"):
            return f"{self.title} builds PhiMoE only as int4 for CUDA (its MoE operator is CUDA-only)"
        return None

    def build(self, job: Job) -> None:
        from onnxruntime_genai.models.builder import create_model, parse_extra_options

        # The quantizer configures the root logger at INFO on import: one line per tensor. Keep warnings.
        logging.getLogger("onnxruntime").setLevel(logging.WARNING)
        params = dict(job.params)
        provider = params.pop("execution_provider")
        # hf_remote is the builder's trust_remote_code: off unless the model opted in.
        options = [f"{key}={_option(value)}" for key, value in sorted(params.items())]
        options.append(f"hf_remote={_option(job.trust_remote_code)}")
        source, output, cache = str(job.source), str(job.output), job.output.parent / "builder-cache"
        try:
            with console_kept(f"{self.title} model builder failed"):
                extra = parse_extra_options(source, source, output, job.precision, provider, str(cache), options)
                create_model(source, source, output, job.precision, provider, str(cache), **extra)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        if not (job.output / "genai_config.json").is_file():
            raise BuildError(f"{self.title} model builder wrote no genai_config.json in {job.output}")

    def smoke(self, artifact: Path, job: Job) -> Smoke:
        provider = job.params["execution_provider"]
        if provider != "cpu":
            return Smoke(False, f"built for the {provider} execution provider; this check runs on the CPU only")
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


def _option(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


BACKEND = OnnxBackend
