"""Model cards on the Hugging Face hub's conventions, one per released artifact (``MODEL_CARD.md``, published as
the repository's ``README.md``): YAML front matter the hub reads (base model and revision, license, library, tags,
pipeline), then where the model came from and what made it, how to run it in its own runtime, what the smoke
check saw, what to know before relying on it, and every file with its sha256.

Everything comes from the artifact's lock entry, so a card says nothing the lock does not pin.
"""

from __future__ import annotations

import json

from . import __version__
from .backends import SMOKE_MESSAGES, SMOKE_QUESTION
from .records import LockEntry

# The library the hub files each artifact under, and the packages whose versions a reader wants first.
LIBRARIES = {"onnx": "onnxruntime-genai", "gguf": "gguf", "openvino": "openvino", "mlx": "mlx"}
MAIN_PACKAGES = {
    "onnx": ("onnxruntime-genai", "onnxruntime", "onnx", "transformers", "torch"),
    "gguf": ("llama-cpp-python", "gguf", "numpy"),
    "openvino": ("openvino", "openvino-tokenizers", "openvino-genai", "nncf", "optimum-intel", "transformers"),
    "mlx": ("mlx", "mlx-lm", "transformers"),
}
QUESTION = SMOKE_MESSAGES[0]["content"]
RUN = {
    "onnx": f'''import json

import onnxruntime_genai as og

model = og.Model(".")
tokenizer = og.Tokenizer(model)
prompt = tokenizer.apply_chat_template(json.dumps([{{"role": "user", "content": "{QUESTION}"}}]),
                                       add_generation_prompt=True)
params = og.GeneratorParams(model)
params.set_search_options(max_length=256)
generator = og.Generator(model, params)
generator.append_tokens(tokenizer.encode(prompt))
stream = tokenizer.create_stream()
while not generator.is_done():
    generator.generate_next_token()
    print(stream.decode(generator.get_next_tokens()[0]), end="", flush=True)''',
    "gguf": f'''from llama_cpp import Llama

llm = Llama("model.gguf", n_ctx=4096, verbose=False)
reply = llm.create_chat_completion(messages=[{{"role": "user", "content": "{QUESTION}"}}], max_tokens=128)
print(reply["choices"][0]["message"]["content"])''',
    "openvino": f'''import openvino_genai

pipeline = openvino_genai.LLMPipeline(".", "CPU")
print(pipeline.generate("{QUESTION}", max_new_tokens=128))''',
    "mlx": f'''from mlx_lm import generate, load

model, tokenizer = load(".")
prompt = tokenizer.apply_chat_template([{{"role": "user", "content": "{QUESTION}"}}], add_generation_prompt=True)
print(generate(model, tokenizer, prompt=prompt, max_tokens=128))''',
}
# Multimodal artifacts (phi4_multimodal): the file that says so, and how to run one with an image.
VISION_FILES = {"onnx": "vision.onnx", "openvino": "openvino_vision_embeddings_model.xml"}
VISION_RUN = {
    "onnx": f'''import json

import onnxruntime  # noqa: F401  (before onnxruntime_genai: 0.18 aborts when it loads onnxruntime itself)
import onnxruntime_genai as og

model = og.Model(".")
tokenizer = og.Tokenizer(model)
prompt = tokenizer.apply_chat_template(json.dumps([{{"role": "user", "content": "<|image_1|>{SMOKE_QUESTION}"}}]),
                                       add_generation_prompt=True)
inputs = model.create_multimodal_processor()(prompt, images=og.Images.open("image.png"))
params = og.GeneratorParams(model)
params.set_search_options(max_length=4096)
generator = og.Generator(model, params)
generator.set_inputs(inputs)
stream = tokenizer.create_stream()
while not generator.is_done():
    generator.generate_next_token()
    print(stream.decode(generator.get_next_tokens()[0]), end="", flush=True)''',
    "openvino": f'''from optimum.intel import OVModelForVisualCausalLM
from PIL import Image
from transformers import AutoProcessor

processor = AutoProcessor.from_pretrained(".")
model = OVModelForVisualCausalLM.from_pretrained(".")
text = processor.tokenizer.apply_chat_template([{{"role": "user", "content": "<|image|>{SMOKE_QUESTION}"}}],
                                               add_generation_prompt=True, tokenize=False)
inputs = processor(text=text, images=[Image.open("image.png").convert("RGB")], return_tensors="pt")
reply = model.generate(**inputs, max_new_tokens=128)[0, inputs["input_ids"].shape[1]:]
print(processor.tokenizer.decode(reply, skip_special_tokens=True))''',
}
VISION_INSTALL = {"onnx": "pip install onnxruntime-genai", "openvino": "pip install optimum-intel openvino pillow"}
VISION_LIMITATIONS = {
    "onnx": ["One image per prompt, and no audio (the speech model is not exported).",
             "onnxruntime-genai 0.18 hands the vision model broken crop masks; the model rebuilds them from the "
             "image's token count and pixels, and takes a pure white strip of the image next to the padding for "
             "padding."],
    "openvino": ["openvino_genai.VLMPipeline 2026.4 runs this layout only under the name phi4mm: give it a copy (or "
                 "links) of this directory whose config.json says \"model_type\": \"phi4mm\"."],
}
# llama-cpp-python built for this CPU's instruction sets, without llama.cpp's AMX kernels (see LIMITATIONS)
AMX_FREE_INSTALL = ('CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON '
                    '-DGGML_AVX512=ON" pip install --no-cache-dir --force-reinstall --no-deps llama-cpp-python')
INSTALL = {"onnx": "pip install onnxruntime-genai", "gguf": "pip install llama-cpp-python",
           "openvino": "pip install openvino-genai", "mlx": "pip install mlx-lm"}
LIMITATIONS = {
    "onnx": ["ONNX Runtime GenAI's tokenizer gives each space of a run its own piece where SentencePiece uses one, "
             "and its decoder keeps SentencePiece's dummy-prefix space.",
             "fp16 models are built for CUDA or DirectML and do not run on the CPU execution provider."],
    "gguf": ["llama.cpp ignores Phi's sliding window: Phi-3-mini-4k answers differently from transformers past 2047 "
             "tokens.", "llama.cpp keeps its KV cache in f16 by default.",
             f"llama-cpp-python compiled on a CPU with AMX (`AMX_INT8 = 1` in `llama_cpp.llama_print_system_info()`: "
             f"Intel Sapphire Rapids and later) crashes in llama.cpp's AMX matrix multiply (ggml-org/llama.cpp issue "
             f"20824); there, build it without AMX: `{AMX_FREE_INSTALL}`."],
    "openvino": ["On CPUs with AVX512-BF16, OpenVINO executes in bf16 unless INFERENCE_PRECISION_HINT is f32.",
                 "OpenVINO's CPU plugin needs AVX2 to run int4 models."],
    "mlx": ["mlx-lm 0.31 applies LongRoPE's long factors at every position (Phi-3.5, Phi-3-128k, Phi-4-mini); this "
            "artifact's config gives it the short factors as both, so it follows transformers within the original "
            "context and keeps the short factors past it.",
            "mlx's quantized matmul on x86 CPUs sums in 16 bits, so there a quantized model answers less faithfully "
            "than on Apple GPUs; the fidelity figures above are computed as Apple GPUs compute (float32 sums)."],
}


def model_card(name: str, entry: LockEntry, figures_checked: bool = True) -> str:
    """The card of artifact ``name``, in Markdown with the hub's YAML front matter; ``figures_checked``: whether
    its fidelity figures were checked against their measurement on the machine writing the card."""
    parts = entry.parts
    backend = parts.backend
    vision = VISION_FILES.get(backend) in entry.files
    run, install = (VISION_RUN, VISION_INSTALL) if vision else (RUN, INSTALL)
    limitations = [*LIMITATIONS.get(backend, ()), *(VISION_LIMITATIONS.get(backend, ()) if vision else ())]
    size = sum(file.size for file in entry.files.values())
    repo = entry.source.removeprefix("hf:").split("@")[0] if entry.source.startswith("hf:") else None
    front = {
        **({"base_model": repo, "base_model_relation": "quantized"} if repo else {}),
        **({"base_model_revision": entry.revision} if entry.revision else {}),
        "license": entry.license or "other",
        "library_name": LIBRARIES.get(backend, backend),
        "pipeline_tag": "image-text-to-text" if vision else "text-generation",
        "tags": ["phibuild", backend, parts.precision,
                 *(str(value) for key, value in sorted(parts.params.items()) if key == "type")],
    }
    source = entry.source + (f" at commit `{entry.revision}`" if entry.revision else "")
    packages = parts.toolchain.packages
    versions = ", ".join(f"{p} {packages[p]}" for p in MAIN_PACKAGES.get(backend, ()) if p in packages)
    params = ", ".join(f"`{key} = {json.dumps(value)}`" for key, value in sorted(parts.params.items())) or "none"
    files = "\n".join(f"| `{file}` | {want.size} | `{want.sha256}` |" for file, want in sorted(entry.files.items()))
    limits = "\n".join(f"- {text}" for text in limitations)
    prompt = "from a Phi chat prompt with an image" if vision else "from a Phi chat prompt"
    figures = _fidelity(entry, figures_checked)
    after = " following the image prompt" if vision else ""
    return f"""---
{_yaml(front)}---

# {name}

{entry.model} quantized to {parts.precision} for {LIBRARIES.get(backend, backend)} by
[phibuild](https://github.com/phibuild/phibuild) {__version__}, as a reproducible build: the cache key below is
the digest of everything that made these bytes, and `doit reproduce` rebuilds them bit for bit.

| | |
|---|---|
| source model | {source} |
| license | {entry.license or "not stated by the source"} |
| source digest (xxh3-128 of its files) | `{parts.source}` |
| backend | {backend}: {versions} (the whole toolchain, {len(packages)} packages, is in artifacts.lock) |
| precision | {parts.precision}: {params} |
| size | {size} bytes ({size / 2**20:.1f} MiB) |
| built on | {', '.join(f"{k} {v}" for k, v in sorted(parts.machine.items()))}, {parts.toolchain.python} |
| cache key | `{entry.key}` (recipe {parts.recipe}) |

## How to run it

In the model's directory, after `{install.get(backend, "")}`{" (image.png: your picture)" if vision else ""}:

```python
{run.get(backend, "")}
```

## Checks

- Smoke check, in {LIBRARIES.get(backend, backend)}'s runtime, greedy, {prompt}: {entry.smoke.summary()}
- Fidelity against the source model in float32 transformers, over held-out text{after}: {figures}

## Limitations

{limits}
- A quantized model answers less faithfully than the model it came from; compare it on your own prompts.

## Files

| file | bytes | sha256 |
|---|---|---|
{files}

Check them with `sha256sum -c SHA256SUMS` in the release directory.
"""


def _fidelity(entry: LockEntry, figures_checked: bool) -> str:
    """The fidelity figures, and what they mean."""
    if entry.fidelity is None:
        return "not measured (`doit fidelity` measures it)"
    if entry.fidelity.not_run is not None:
        return entry.fidelity.summary()
    unchecked = "" if figures_checked else (
        " (as artifacts.lock records them: their measurement was in neither the store nor the remote of the machine "
        "that wrote this card, so they were not checked against it there)")
    return (f"{entry.fidelity.summary()}{unchecked}. KL is how far this model's next-token distribution is from the "
            "source's, averaged over positions (0 is identical; each quarter of a window is shown, so that an error "
            "growing with position shows); top-1 is how often both pick the same most likely token.")


def _yaml(data: dict) -> str:
    """The small YAML subset the front matter needs: strings and lists of strings, quoted as JSON (valid YAML)."""
    lines = []
    for key, value in data.items():
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines += [f"- {json.dumps(item)}" for item in value]
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    return "\n".join(lines) + "\n"
