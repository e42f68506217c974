"""llama.cpp GGUF: our converter (``convert.py`` here) writes one F16 (or F32, BF16) GGUF per model,
shared by every precision; llama.cpp's quantizer, through llama-cpp-python, makes the quantized ones.

A precision's ``type`` is the llama.cpp file type it ends as, ``base`` the converter output it starts
from. When the two agree (fp16 from f16, fp32 from f32) the artifact is the shared conversion itself,
hardlinked. ``base = "q8_0"`` asks the converter for Q8_0 straight from the checkpoint (one rounding
instead of two), and then builds only type Q8_0.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import resource
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from ...errors import BuildError
from ...linking import link_file
from .. import SMOKE_MESSAGES, SMOKE_TOKENS, Backend, Job, Runtime, Smoke, replaced
from .fingerprint import quantizer
from .types import ARCHITECTURES, BASES, MODEL, TYPES, file_type


class GgufBackend(Backend):
    name = "gguf"
    title = "llama.cpp GGUF"
    toolchain = "gguf"
    architectures = frozenset(ARCHITECTURES)
    precisions: ClassVar[dict[str, dict[str, Any]]] = {
        "int4": {"type": "Q4_K_M", "base": "f16"},
        "int8": {"type": "Q8_0", "base": "f16"},
        "fp16": {"type": "F16", "base": "f16"},
        "fp32": {"type": "F32", "base": "f32"},
    }

    unsupported = {
        "Phi3SmallForCausalLM": "llama.cpp has no architecture for Phi-3-small (build it with onnx)",
        "Phi3VForCausalLM": "llama.cpp has no Phi-3.5-vision support (no mmproj projector for it)",
        # Its "phi4" projector is Phi-4-reasoning-vision's; on phi4-multimodal-tiny it was 4.5 off in the logits.
        **dict.fromkeys(("Phi4MMForCausalLM", "Phi4MultimodalForCausalLM"),
                        "llama.cpp's phi4 mmproj is Phi-4-reasoning-vision's: no HD crops, 2x2 pooling or "
                        "separators, so Phi-4-multimodal's image tokens come out wrong"),
    }

    def check_params(self, precision: str, params: dict[str, Any]) -> str | None:
        kind, base = params["type"], params["base"]
        if kind not in TYPES:
            return f"unknown llama.cpp type {kind!r}; choose one of {', '.join(TYPES)}"
        if base not in BASES:
            return f"base must be one of {', '.join(BASES)} (the converter's output), not {base!r}"
        if base == "q8_0" and kind != "Q8_0":
            return f"base q8_0 is already quantized; it builds only type Q8_0, not {kind}"
        return None

    def machine(self, facts: Callable[[], dict[str, str]], params: dict[str, Any]) -> dict[str, str]:
        """llama.cpp's quantizer rounds as libggml-base was compiled (see fingerprint.py); a conversion alone,
        or a precision that is the conversion itself, does not run it."""
        machine = super().machine(facts, params)
        if params.get("type", "").lower() not in ("", params.get("base")):
            machine["quantizer"] = facts()["quantizer"]
        return machine

    def intermediate(self, precision: str, params: dict[str, Any]) -> dict[str, Any]:
        return {"outtype": params["base"]}

    def build_intermediate(self, job: Job) -> None:
        from .convert import convert

        convert(job.source, job.output / MODEL, job.params["outtype"])

    def build(self, job: Job) -> None:
        converted, params = job.intermediate / MODEL, job.params
        if params["type"].lower() == params["base"]:
            link_file(converted, job.output / MODEL)  # the shared conversion is the artifact
        else:
            quantize(converted, job.output / MODEL, params["type"], os.cpu_count() or 1)

    def smoke(self, artifact: Path, job: Job) -> Smoke:
        """Greedy tokens from the Phi chat prompt, laid out by the GGUF's own chat template."""
        import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        path = artifact / MODEL
        with contextlib.closing(llama(path, n_ctx=256, n_threads=2, verbose=False)) as llm:
            template = llm.metadata.get("tokenizer.chat_template")
            if not template:
                raise BuildError(f"{path} has no chat template to build the smoke prompt with")
            chat = Jinja2ChatFormatter(template, eos_token=_text(llm, llm.token_eos()),
                                       bos_token=_text(llm, llm.token_bos()))
            prompt = llm.tokenize(chat(messages=SMOKE_MESSAGES).prompt.encode(), add_bos=True, special=True)
            vocab = llama_cpp.llama_model_get_vocab(llm.model)
            tokens = []
            for token in llm.generate(prompt, temp=0.0):  # temperature 0: greedy
                tokens.append(token)
                if len(tokens) == SMOKE_TOKENS or llama_cpp.llama_vocab_is_eog(vocab, token):
                    break
            text = llm.detokenize(tokens).decode("utf-8", errors="replace")
        return Smoke.generated(self.title, tokens, text)

    def runtime(self, artifact: Path, job: Job) -> Runtime:
        return LlamaRuntime(artifact / MODEL)

    def facts(self) -> dict[str, str]:
        return {"quantizer": quantizer(), "amx": str(amx_built_in()).lower()}

    def runtime_machine(self, facts: Callable[[], dict[str, str]]) -> dict[str, str]:
        return {"extra_buffer_types": "off"} if facts()["amx"] == "true" else {}


def llama(path: Path, **options: Any) -> Any:
    """``llama_cpp.Llama(path, **options)`` with llama.cpp's defaults, except where llama-cpp-python was compiled
    with llama.cpp's AMX kernels (on a CPU with AMX, as pip builds it there): their matrix multiply crashes the
    process (SIGSEGV in ggml_backend_amx_mul_mat, llama-cpp-python 0.3.36, on the embedded models' 256-wide
    layers), so models are loaded without llama.cpp's extra buffer types (AMX, and repacked weights), on its
    plain CPU kernels. llama-cpp-python sets no such option, so its default parameters are adjusted while it
    loads."""
    import llama_cpp

    if not amx_built_in():
        return llama_cpp.Llama(str(path), **options)
    from llama_cpp import llama_cpp as native

    defaults = native.llama_model_default_params

    def without_extra_buffer_types():
        params = defaults()
        params.use_extra_bufts = False
        return params

    with replaced(native, llama_model_default_params=without_extra_buffer_types):
        return llama_cpp.Llama(str(path), **options)


@functools.cache
def amx_built_in() -> bool:
    """Whether the installed llama.cpp was compiled with its AMX kernels."""
    import llama_cpp

    return "AMX_INT8 = 1" in llama_cpp.llama_print_system_info().decode()


class LlamaRuntime(Runtime):
    """llama-cpp-python with its defaults (an f16 KV cache, its own thread count), a context as long as the
    sequence and logits kept for every position."""

    def __init__(self, path: Path):
        self.path, self.llm = path, None
        self.settings = "llama.cpp (llama-cpp-python), its defaults: KV cache f16" + (
            "; without extra buffer types (its AMX kernels crash)" if amx_built_in() else "")

    def logits(self, ids):
        import numpy as np

        llm = self._loaded(len(ids))
        llm.reset()
        llm.eval(list(ids))
        return np.array(llm.scores[:len(ids)], dtype=np.float32)

    def decode(self, ids, count):
        tokens = self._loaded(len(ids) + count + 1).generate(list(ids), top_k=1, temp=0.0, reset=True)
        next(tokens)  # the prompt's prefill, and the first token
        start = time.perf_counter()
        for _ in range(count):
            next(tokens)
        return count / (time.perf_counter() - start)

    def _loaded(self, length: int):
        """The model with a context of at least ``length`` tokens."""
        if self.llm is None or self.llm.n_ctx() < length:
            if self.llm is not None:
                self.llm.close()
            self.llm = llama(self.path, n_ctx=length, n_batch=length, logits_all=True, verbose=False)
        return self.llm

    def __del__(self):
        if self.llm is not None:
            self.llm.close()


def quantize(source: Path, output: Path, kind: str, threads: int) -> None:
    """llama.cpp's ``llama_model_quantize`` of ``source`` to file type ``kind``. Each row is quantized
    on its own, so the bytes do not depend on ``threads``."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = file_type(kind)
    logger = logging.getLogger("llama-cpp-python")  # where llama-cpp-python sends llama.cpp's log
    level = logger.level
    logger.setLevel(logging.ERROR)  # a line per tensor otherwise; errors still show
    try:
        code = llama_cpp.llama_model_quantize(str(source).encode(), str(output).encode(), ctypes.byref(params))
    finally:
        logger.setLevel(level)
    if code != 0 or not output.is_file():
        raise BuildError(f"llama.cpp could not quantize {source} to {kind} (llama_model_quantize returned {code})"
                         + _why_not_written(output, source.stat().st_size))


def _why_not_written(output: Path, needed: int) -> str:
    """What stops a file of up to ``needed`` bytes from being written at ``output``, if anything does: llama.cpp
    reports only that it failed."""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and limit < needed:
        return (f": this process may not write files larger than {limit} bytes (ulimit -f), and the quantized "
                f"model may take up to {needed}")
    free = shutil.disk_usage(output.parent).free
    if free < needed:
        return (f": {output.parent} has {free / 2**20:.0f} MiB free, and the quantized model may take up to "
                f"{needed / 2**20:.0f} MiB; free space there (`doit gc --delete` removes unused store entries)")
    return ""


def _text(llm, token: int) -> str:
    return llm.detokenize([token], special=True).decode("utf-8", errors="replace")


BACKEND = GgufBackend
