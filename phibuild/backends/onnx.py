"""ONNX Runtime GenAI: its model builder (``onnxruntime_genai.models.builder``), run in-process.

int4 and int8 are weight-only MatMulNBits quantization (block size, symmetry, algorithm and accuracy level
as parameters), done one weight at a time (onnx_quantize.py): the builder's own bytes, without its float32
copy of the whole model in memory. fp32 runs on the CPU execution provider; fp16 targets CUDA or DirectML, so
it is built here but its smoke check cannot run on a CPU-only machine and says so.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import BuildError
from . import (
    SMOKE_MESSAGES,
    SMOKE_TOKENS,
    Backend,
    CannotRun,
    Job,
    Runtime,
    Smoke,
    replaced,
)
from .onnx_quantize import one_weight_at_a_time

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


TITLE = "ONNX Runtime GenAI"


class OnnxBackend(Backend):
    name = "onnx"
    title = TITLE
    toolchain = "onnx"
    architectures = frozenset({"Phi3ForCausalLM", "Phi3SmallForCausalLM", "PhiMoEForCausalLM",
                               "Phi4MultimodalForCausalLM"})  # onnx_vision.py
    # The builder makes only the text decoder of these; their image encoders are exported by the repositories' own
    # scripts, for their own code (phibuild exports the native Phi4MultimodalForCausalLM's: onnx_vision.py).
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
            from . import onnx_vision

            return onnx_vision.build(job)
        return run_builder(job, job.source)

    def smoke(self, artifact: Path, job: Job) -> Smoke:
        provider = job.params["execution_provider"]
        if provider != "cpu":
            return Smoke(False, f"built for the {provider} execution provider; this check runs on the CPU only")
        if job.vision:
            from . import onnx_vision

            return onnx_vision.smoke(artifact, job)
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
            from .onnx_vision import VisionRuntime

            return VisionRuntime(artifact)
        import onnxruntime_genai as og

        return GenaiRuntime(og.Model(str(artifact)))

    def image_logits(self, artifact: Path, job: Job) -> Any:
        from . import onnx_vision

        return onnx_vision.image_logits(artifact, job)


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


def run_builder(job: Job, source: Path, *options: str) -> None:
    """The model builder, in-process, from ``source`` into ``job.output`` with the job's precision and parameters
    and the builder's extra ``options``; its CPU-dependent steps made machine-independent and int4/int8 quantized
    one weight at a time."""
    from onnxruntime_genai.models import builder
    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    # The quantizer configures the root logger at INFO on import: one line per tensor. Keep warnings.
    logging.getLogger("onnxruntime").setLevel(logging.WARNING)
    params = dict(job.params)
    provider = params.pop("execution_provider")
    # hf_remote is the builder's trust_remote_code: off unless the model opted in.
    extra_options = [f"{key}={option(value)}" for key, value in sorted(params.items())]
    extra_options += [f"hf_remote={option(job.trust_remote_code)}", *options]
    path, output, cache = str(source), str(job.output), job.output.parent / "builder-cache"
    try:
        with machine_independent() as calls, one_weight_at_a_time(defining(builder.Phi3MiniModel, "to_nbits")):
            extra = parse_extra_options(path, path, output, job.precision, provider, str(cache), extra_options)
            create_model(path, path, output, job.precision, provider, str(cache), **extra)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if not (job.output / "genai_config.json").is_file():
        raise BuildError(f"{TITLE} model builder wrote no genai_config.json in {job.output}")
    if not calls:
        raise BuildError(f"{TITLE} model builder did not compute its rotary caches where phibuild makes them the "
                         "same on every CPU (a builder phibuild does not know?); nothing was published")


@contextlib.contextmanager
def machine_independent() -> Iterator[list[int]]:
    """The builder with its CPU-dependent steps replaced, for the duration of one build (yields the calls made
    to the rotary caches, which a Phi build must make):

    - rotary cos/sin caches, stored in model.onnx: ``theta ** e``, cos and sin correctly rounded (reference.py)
      instead of torch's dispatched pow and MKL's per-CPU cos/sin; the rest is the builder's own arithmetic
      (IEEE-exact multiplies, divides and casts), and the result is checked against the builder's own (within
      1e-3: an ulp of its pow grows with the position, to 7e-5 at 128k), so a builder that changes its formula
      fails instead of building something else;
    - the longrope and yarn magnitude scales: correctly rounded logarithms instead of numpy's;
    - producer_version: the installed package's version and commit, as the builder writes for a wheel, instead
      of ``git rev-parse HEAD`` run in the directory above site-packages (a virtualenv inside a checkout would
      stamp that checkout's commit) or a VERSION_INFO file found there.
    """
    import numpy as np
    import onnxruntime_genai
    import torch
    from onnxruntime_genai.models import builder

    from .reference import cos_sin_f32, log_f64, pow_f32  # here: numpy is not imported to list tasks

    # builder.py imports its classes as the top-level package `builders` (models/ is put on sys.path), so
    # the class create_model uses is found through the model classes it imports, not by module name.
    model = defining(builder.Phi3MiniModel, "make_rotary_embedding_caches_from_scratch")
    original = model.make_rotary_embedding_caches_from_scratch
    calls: list[int] = []

    def caches(self):
        attrs = self.rope_attrs
        dim = int(attrs["partial_rotary_factor"] * self.head_size)
        exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        inv_freq = 1.0 / (attrs["rescale_factors"] * torch.from_numpy(pow_f32(attrs["theta"], exponents.numpy())))
        if "rescale_inv_freq" in attrs:
            inv_freq = self.make_inv_freq_rescaled(inv_freq)
        position_scale = attrs["position_scale"] if self.context_length == self.original_context_length else 1
        t = (torch.arange(attrs["cache_length"], dtype=attrs["t_dtype"]) * position_scale).type_as(inv_freq)
        cos, sin = (torch.from_numpy(c) for c in cos_sin_f32(torch.outer(t, inv_freq).numpy()))
        cos_cache = torch.cat((cos, cos), dim=-1) * attrs["mscale"]
        sin_cache = torch.cat((sin, sin), dim=-1) * attrs["mscale"]
        for mine, theirs in zip((cos_cache, sin_cache), original(self), strict=True):
            if mine.shape != theirs.shape or mine.dtype != theirs.dtype or float(
                    (mine - theirs).abs().max()) > 1e-3 * max(1.0, float(attrs["mscale"])):
                raise BuildError("the ONNX builder's rotary caches are no longer computed as phibuild reproduces "
                                 "them (a newer builder?); nothing was published")
        calls.append(1)
        return cos_cache, sin_cache

    def mscale_su(self, mscale):
        return 1.0 if mscale <= 1.0 else np.sqrt(1 + log_f64(mscale) / log_f64(self.original_context_length))

    def mscale_yarn(self, mscale):
        return 1.0 if mscale <= 1.0 else 0.1 * log_f64(mscale) + 1.0

    with replaced(model, make_rotary_embedding_caches_from_scratch=caches, make_mscale_su=mscale_su,
                  make_mscale_yarn=mscale_yarn,
                  get_genai_version=classmethod(lambda cls: onnxruntime_genai.__version__ or None),
                  get_genai_commit=classmethod(lambda cls: getattr(onnxruntime_genai, "__commit__", None) or None)):
        yield calls


def defining(cls: type, name: str) -> type:
    """The class in ``cls``'s MRO that defines ``name``: where a builder method is replaced for one build."""
    return next(base for base in cls.__mro__ if name in base.__dict__)


def option(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


BACKEND = OnnxBackend
