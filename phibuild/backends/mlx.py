"""MLX through mlx-lm: ``mlx_lm.convert`` run in-process on a local view of the checkpoint.

int4 and int8 are mlx-lm's weight quantization: ``bits`` (int4: 2-6, int8: 8), ``group_size`` (32, 64 or
128) and ``mode`` (affine, or the fixed-shape float formats mxfp4 and nvfp4 at int4, mxfp8 at int8). At int4,
``recipe`` picks one of mlx-lm's mixed-bit recipes (mixed_2_6, mixed_3_4, mixed_3_6, mixed_4_6), which give
each layer its bits. ``dtype`` is what unquantized tensors and quantization scales are stored in: ``auto``
keeps the checkpoint's own (bfloat16 for Phi), as ``mlx_lm.convert`` does and as int4 does here; int8 defaults
to float16, chosen on measured fidelity: bfloat16 scales are rounded to 8 bits, which costs int8 about half a
quantization step (KL 1.4e-4 to 2.3e-4 and top-1 98% on the embedded models with ``auto``, against 2.6e-5 to
3e-5 and 99.1 to 99.4% with float16, at the same size), and ``dtype = "auto"`` gives the cookbook's conversion
back. fp16 may be float16 or bfloat16. As in
mlx-lm, a layer whose input width is not a multiple of the group size stays unquantized (the embedded models,
256 and 512 wide, are quantized whole).

mlx-lm reads only the checkpoint files phibuild hashes, linked into a scratch directory, so it never
resolves a hub id. Checkpoints saved by transformers 5 keep RoPE settings only in ``rope_parameters``,
which mlx-lm 0.31's Phi models ignore (plain RoPE at theta 10000, silently): the staged config.json gets
them at the top level too. Two builds write the same bytes: nothing in them depends on time, paths or the
process, and mlx-lm sorts config.json. mlx-lm's README.md, a blank hub model card, is dropped. The
tokenizer files are transformers' re-serialization (``TokenizersBackend``, no ``tokenizer.model``), so
transformers and tokenizers are in the key.

What mlx-lm 0.31 runs differently from transformers, with exact weights: LongRoPE (Phi-3.5, Phi-3 128k,
Phi-4-mini) uses ``long_factor`` at every position, where transformers uses ``short_factor`` up to
``original_max_position_embeddings``, so the staged config gives it the short factors for both
(``_short_longrope``): the artifact then matches transformers within the original context, and past it keeps the
short factors; Phi-3.5-MoE routes with a softmax over the top-2 gate logits, not
sparsemixer. Phi-3-small needs mlx-lm 0.32.2 or later (earlier releases crash running it), as the toolchain's
lock has. On mlx's CPU backend, MoE
models in 16 bits cannot run (float32-only gather_mm), so their smoke check says it did not run.
"""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from .. import sources
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

# The mlx-lm model module each architecture needs (mlx_lm/models/<type>.py).
MODEL_TYPES = {
    "Phi3ForCausalLM": "phi3",
    "PhiMoEForCausalLM": "phimoe",
    "PhimoeForCausalLM": "phimoe",  # transformers' own spelling of Phi-3.5-MoE
    "Phi3SmallForCausalLM": "phi3small",
}
# Models an mlx-lm release ships but cannot run: model type -> (first release that can, why not).
BROKEN_BEFORE = {
    "phi3small": ("0.32.2", "a segmentation fault: an out-of-bounds write masking dummy token ids"),
}
BITS = {"int4": (2, 3, 4, 5, 6), "int8": (8,)}
GROUP_SIZES = (32, 64, 128)
# Float formats have one shape each: (bits, group_size).
FLOAT_MODES = {"mxfp4": (4, 32), "nvfp4": (4, 16), "mxfp8": (8, 32)}
# mlx-lm's mixed recipes, and the bits they give a layer: (low, high).
RECIPES = {"mixed_2_6": (2, 6), "mixed_3_4": (3, 4), "mixed_3_6": (3, 6), "mixed_4_6": (4, 6)}
DTYPES = {"int4": ("auto", "float16", "bfloat16", "float32"), "int8": ("auto", "float16", "bfloat16", "float32"),
          "fp16": ("float16", "bfloat16"), "fp32": ("float32",)}
QUANTIZED = {"group_size": 64, "mode": "affine", "recipe": "none", "dtype": "auto"}
CPU_SMOKE_BYTES = 2**30  # past this much weight, the smoke check on mlx's CPU backend generates one token


class MlxBackend(Backend):
    name = "mlx"
    title = "MLX (mlx-lm)"
    toolchain = "mlx"
    recipe = 2  # 2: LongRoPE staged with its short factors
    architectures = frozenset(MODEL_TYPES)
    # mlx-vlm is what converts vision models for MLX; it needs a toolchain of its own (transformers >= 5.14),
    # which phibuild does not have yet. Installed without its dependencies beside transformers 5.5, 0.6.4's
    # phi4mm (no HD crops, pooling, separators or longrope) was 4.6 off transformers in the logits of
    # phi4-multimodal-tiny's image prompt.
    unsupported: ClassVar[dict[str, str]] = dict.fromkeys(
        ("Phi3VForCausalLM", "Phi4MMForCausalLM", "Phi4MultimodalForCausalLM"),
        "mlx-vlm, which converts vision models, has no toolchain in phibuild yet (it needs transformers >= 5.14)")
    precisions: ClassVar[dict[str, dict[str, Any]]] = {
        "int4": {"bits": 4, **QUANTIZED},
        "int8": {"bits": 8, **QUANTIZED, "dtype": "float16"},
        "fp16": {"dtype": "float16"},
        "fp32": {"dtype": "float32"},
    }

    def check_params(self, precision: str, params: dict[str, Any]) -> str | None:
        if params["dtype"] not in DTYPES[precision]:
            return f"dtype at {precision} must be one of {', '.join(DTYPES[precision])}, not {params['dtype']!r}"
        if "bits" in params:
            return _refuse_quantization(precision, params)
        return None

    def refuse_architecture(self, architecture: str, precision: str, params: dict[str, Any],
                            packages: dict[str, str]) -> str | None:
        model_type = MODEL_TYPES[architecture]
        if model_type in BROKEN_BEFORE:
            from packaging.version import Version  # here: listing tasks need not import it

            fixed, why = BROKEN_BEFORE[model_type]
            installed = packages.get("mlx-lm", "0")
            if Version(installed) < Version(fixed):
                return f"mlx-lm {installed} cannot run it ({why}; fixed in {fixed})"
        return None

    def build(self, job: Job) -> None:
        from mlx_lm import convert

        source, output, params = job.source, job.output, job.params
        staged, converted = output.parent / "mlx-source", output.parent / "mlx-output"
        _stage(source, staged, job.trust_remote_code)
        options = dict(dtype=_dtype(source, params["dtype"]), trust_remote_code=job.trust_remote_code)
        if "bits" in params:
            recipe = params["recipe"]
            options.update(quantize=True, q_bits=params["bits"], q_group_size=params["group_size"],
                           q_mode=params["mode"], quant_predicate=None if recipe == "none" else recipe)
        try:
            convert(hf_path=str(staged), mlx_path=str(converted), **options)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        try:
            (converted / "README.md").unlink(missing_ok=True)
            for path in converted.iterdir():
                path.rename(output / path.name)
        finally:
            shutil.rmtree(converted, ignore_errors=True)
        if not (output / "config.json").is_file() or not list(output.glob("model*.safetensors")):
            raise BuildError(f"mlx_lm.convert wrote no config.json or model*.safetensors in {output}")

    def smoke(self, artifact: Path, job: Job) -> Smoke:
        import mlx.core as mx
        from mlx_lm import load
        from mlx_lm.generate import generate_step

        model, tokenizer = load(str(artifact), tokenizer_config={"trust_remote_code": job.trust_remote_code})
        reason = _cpu_cannot_run(model)
        if reason:
            return Smoke(False, reason)
        prompt = tokenizer.apply_chat_template(SMOKE_MESSAGES, add_generation_prompt=True, tokenize=False)
        prompt_ids = mx.array(tokenizer.encode(prompt, add_special_tokens=False))
        bounded = _bounded_on_cpu(artifact)
        count = 1 if bounded else SMOKE_TOKENS
        # generate_step rather than stream_generate: the latter's detokenizer fails on the padding ids past
        # the tokenizer's last token that Phi vocabularies have (32064 rows for 32011 tokens).
        # No sampler: mlx-lm takes the argmax, so the tokens are a function of the artifact.
        tokens = []
        with _gpu_arithmetic(bool(bounded)):
            for token, _ in generate_step(prompt_ids, model, max_tokens=count):
                tokens.append(token)
                if token in tokenizer.eos_token_ids:
                    break
        padding = sum(token >= len(tokenizer.get_vocab()) for token in tokens)
        note = f" ({padding} of them padding ids past the tokenizer's tokens)" if padding else ""
        return Smoke.generated("mlx-lm", tokens, tokenizer.decode(tokens), note + bounded)

    def runtime(self, artifact: Path, job: Job) -> Runtime:
        from mlx_lm import load

        model, _ = load(str(artifact), tokenizer_config={"trust_remote_code": job.trust_remote_code})
        reason = _cpu_cannot_run(model)
        if reason:
            raise CannotRun(reason)
        return MlxRuntime(model)


class MlxRuntime(Runtime):
    """The mlx-lm model on mlx's default device, a whole sequence at once.

    On a GPU, as it is. On the CPU, the logits' quantized matmuls are computed as mlx's GPU kernels compute them
    (``_gpu_arithmetic``): where mlx's CPU backend has no SIMD path for them (x86), its quantized matmul adds up
    each dot product in the activations' 16-bit type, which no Apple GPU does. Measured against float64 on
    1024x256 by 256x1088 products: relative error 5e-3 (float16) and 4e-2 (bfloat16) from mlx's CPU kernel, 7e-4
    and 6e-3 (the output's own rounding) as a GPU computes them, 6e-7 both in float32; and the CPU kernel ran
    10 to 60 times slower. The MLX artifacts' users run them on Apple GPUs, so the figures are theirs. Decoding
    speed is mlx's own CPU kernels' (the loop users would run on this machine).
    """

    def __init__(self, model):
        import mlx.core as mx

        self.model = model
        self.cpu = mx.default_device().type == mx.DeviceType.cpu
        self.settings = ("mlx-lm on mlx's cpu device, quantized matmuls accumulated in float32 as on Apple GPUs"
                         if self.cpu else f"mlx-lm on mlx's {mx.default_device().type.name} device")

    def logits(self, ids):
        import mlx.core as mx
        import numpy as np

        with _gpu_arithmetic(self.cpu):
            logits = self.model(mx.array([list(ids)]))[0].astype(mx.float32)
            mx.eval(logits)
        return np.array(logits)

    def decode(self, ids, count):
        import mlx.core as mx
        from mlx_lm.generate import generate_step

        steps = generate_step(mx.array(list(ids)), self.model, max_tokens=count + 1)  # greedy by default
        next(steps)  # the prompt's prefill, and the first token
        start = time.perf_counter()
        for _ in range(count):
            next(steps)
        return count / (time.perf_counter() - start)


@contextlib.contextmanager
def _gpu_arithmetic(active: bool) -> Iterator[None]:
    """While active, ``mx.quantized_matmul`` (which mlx's quantized layers call) computes as mlx's GPU kernels
    do: scales and biases applied and products summed in float32, the result rounded once to the activations'
    type. A test holds it to mlx's own kernel where that kernel sums in float32 (float32 activations)."""
    if not active:
        yield
        return
    import mlx.core as mx

    def quantized_matmul(x, w, scales, biases=None, transpose=True, group_size=None, bits=None, mode="affine"):
        if biases is not None:  # affine: scale * q + bias, in float32
            scales, biases = scales.astype(mx.float32), biases.astype(mx.float32)
        weights = mx.dequantize(w, scales, biases, group_size=group_size, bits=bits, mode=mode, dtype=mx.float32)
        return (x.astype(mx.float32) @ (weights.T if transpose else weights)).astype(x.dtype)

    with replaced(mx, quantized_matmul=quantized_matmul):
        yield


def _bounded_on_cpu(artifact: Path) -> str:
    """Why the smoke check generates one token, or "" when it generates SMOKE_TOKENS.

    mlx's CPU backend has no SIMD quantized matmul on x86: each token costs about 5 ms per million weights (18 s
    for Phi-3.5-mini, 70 s for Phi-4), so eight tokens after the 15-token chat prompt would take 7 and 28
    minutes. Past CPU_SMOKE_BYTES of weights, on the CPU, the check reads the prompt and generates one token with
    the quantized matmuls computed as Apple GPUs compute them (``_gpu_arithmetic``, 3 times faster over a prompt):
    it still loads the artifact in mlx-lm and generates from the chat prompt, at the cost of one pass."""
    import mlx.core as mx

    if mx.default_device().type != mx.DeviceType.cpu:
        return ""
    weights = sum(path.stat().st_size for path in artifact.glob("*.safetensors"))
    if weights <= CPU_SMOKE_BYTES:
        return ""
    return (f" (one token: {weights / 2**30:.1f} GiB of weights on mlx's CPU backend, quantized matmuls "
            "computed as on Apple GPUs)")


def _cpu_cannot_run(model) -> str | None:
    """Why mlx's CPU backend cannot run ``model``, if it cannot; None on a GPU (Metal, CUDA)."""
    import mlx.core as mx
    from mlx_lm.models.switch_layers import SwitchLinear

    if mx.default_device().type != mx.DeviceType.cpu:
        return None
    dtypes = {module.weight.dtype for _, module in model.named_modules() if isinstance(module, SwitchLinear)}
    if dtypes - {mx.float32}:
        return ("unquantized mixture-of-experts layers in 16 bits run on a GPU only (mlx's CPU gather_mm is "
                "float32-only); this check runs on Apple silicon")
    return None


def _refuse_quantization(precision: str, params: dict[str, Any]) -> str | None:
    bits, group_size, mode, recipe = params["bits"], params["group_size"], params["mode"], params["recipe"]
    if mode in FLOAT_MODES:
        shape = FLOAT_MODES[mode]
        if (bits, group_size) != shape or bits not in BITS[precision]:
            at = "int4" if shape[0] == 4 else "int8"
            return (f"mode {mode} is {shape[0]} bits in groups of {shape[1]}: use it at {at} with "
                    f"bits = {shape[0]} and group_size = {shape[1]}")
    elif mode == "affine":
        if bits not in BITS[precision]:
            return f"bits at {precision} must be one of {', '.join(map(str, BITS[precision]))}, not {bits!r}"
        if group_size not in GROUP_SIZES:
            return f"group_size must be 32, 64 or 128 for affine quantization, not {group_size!r}"
    else:
        return f"mode must be affine, {', '.join(FLOAT_MODES)}, not {mode!r}"
    if recipe == "none":
        return None
    if recipe not in RECIPES:
        return f"recipe must be none or one of {', '.join(RECIPES)}, not {recipe!r}"
    low, high = RECIPES[recipe]
    if precision != "int4" or mode != "affine":
        return f"recipe {recipe} ({low} and {high} bits) is affine quantization at int4 only"
    if bits != 4:
        return f"recipe {recipe} gives each layer {low} or {high} bits itself; leave bits at 4"
    return None


@functools.cache
def _dtype(source: Path, dtype: str) -> str | None:
    """The dtype to hand mlx-lm; ``auto`` is the checkpoint's own (config ``torch_dtype``, or ``dtype``)."""
    if dtype != "auto":
        return dtype
    config = sources.read_config(source)
    found = config.get("torch_dtype") or config.get("dtype")
    return found if found in ("float16", "bfloat16", "float32") else None


def _stage(source: Path, staged: Path, trust_remote_code: bool) -> None:
    """Link the checkpoint files phibuild hashed into ``staged``, so mlx-lm reads nothing else (no ``*.py``
    unless the model opted in to running its code).

    config.json is written instead, with the RoPE settings where mlx-lm reads them (``_legacy_rope``) and
    LongRoPE's factors as mlx-lm can follow transformers (``_short_longrope``).
    """
    for path in sources.source_files(source, trust_remote_code):
        link = staged / path.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.name == "config.json" and link.parent == staged:
            link.write_text(json.dumps(_short_longrope(_legacy_rope(sources.read_config(source))), indent=2))
        else:
            link.symlink_to(path.resolve())


def _legacy_rope(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with RoPE settings at the top level too, where mlx-lm's Phi models look for them.

    transformers 5 saves them only in ``rope_parameters``; mlx-lm 0.31's phi3 and phimoe read
    ``rope_theta``, ``partial_rotary_factor`` and ``rope_scaling`` (with ``type``) and would otherwise run
    plain RoPE at theta 10000 without a word. Hub checkpoints have the top-level keys and pass unchanged.
    """
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict):
        return config
    config = dict(config)
    for key in ("rope_theta", "partial_rotary_factor"):
        if key in rope:
            config.setdefault(key, rope[key])
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind != "default" and not config.get("rope_scaling"):
        config["rope_scaling"] = {**{k: v for k, v in rope.items() if k not in ("rope_theta", "rope_type")},
                                  "type": kind}
    return config


def _short_longrope(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with LongRoPE's ``long_factor`` set to its ``short_factor``: mlx-lm 0.31 applies the long
    factors at every position, where transformers uses the short ones up to ``original_max_position_embeddings``
    (4096 for Phi-3.5 and Phi-4-mini), so an artifact built as is answers differently from its source at any
    length (measured: KL 0.11-0.15 nats/token at fp32). With both set to the short factors, it computes what
    transformers computes within the original context, the attention scale included; past it, it keeps the short
    factors where transformers switches to the long ones."""
    scaling = config.get("rope_scaling")
    if not isinstance(scaling, dict) or (scaling.get("type") or scaling.get("rope_type")) != "longrope":
        return config
    return {**config, "rope_scaling": {**scaling, "long_factor": scaling["short_factor"]}}


BACKEND = MlxBackend
