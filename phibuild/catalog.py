"""The Phi models phibuild knows by name: the real ones on the Hugging Face hub and the tiny look-alikes
embedded in the package (``phibuild/embedded/``), which need no network.

Shapes and backend support come from ``shared/phi-family.md``; a model defined in ``[tool.phibuild.model.NAME]``
is a :class:`ModelSpec` too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

EMBEDDED_DIR = Path(__file__).parent / "embedded"

# Files a build reads from a Hugging Face checkpoint directory; everything else (README, images,
# original/ PyTorch pickles) is ignored, downloaded by no one and hashed by no one. The model's own code
# (CODE_PATTERNS) is read only when the model opts in to running it (trust_remote_code).
SOURCE_PATTERNS = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",  # image and audio processors (vision models)
    "processor_config.json",
    "adapter_config.json",  # LoRA adapters in subdirectories (Phi-4-multimodal's vision-lora/, speech-lora/)
)
CODE_PATTERNS = ("*.py",)
# Architectures that read images as well as text. Phi-3.5-vision and the hub's Phi-4-multimodal run their own
# code; transformers 5.5 has a class of its own for Phi-4-multimodal's layout only in its native form.
VISION_ARCHITECTURES = frozenset({"Phi3VForCausalLM", "Phi4MMForCausalLM", "Phi4MultimodalForCausalLM"})


@dataclass(frozen=True)
class ModelSpec:
    """Where a model's files come from: exactly one of ``repo`` (hub) or ``path`` (local directory)."""

    name: str
    architecture: str | None = None  # known up front for catalog models; read from config.json otherwise
    repo: str | None = None
    revision: str | None = None  # branch, tag or commit asked for; the lock pins the commit
    path: Path | None = None
    embedded: bool = False
    trust_remote_code: bool = False  # run code from the model's directory (hub "remote code"): opt-in only
    parameters: float | None = None  # billions, as published; what a first build downloads, in bfloat16

    def patterns(self) -> tuple[str, ...]:
        """The files of the model a build reads."""
        return SOURCE_PATTERNS + (CODE_PATTERNS if self.trust_remote_code else ())


def _hub(name: str, repo: str, architecture: str, parameters: float) -> ModelSpec:
    return ModelSpec(name, architecture, repo=repo, parameters=parameters)


def _embedded(name: str, architecture: str = "Phi3ForCausalLM") -> ModelSpec:
    return ModelSpec(name, architecture, path=EMBEDDED_DIR / name, embedded=True)


CATALOG: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        _hub("phi3-mini-4k", "microsoft/Phi-3-mini-4k-instruct", "Phi3ForCausalLM", 3.8),  # 3.8B, 4k context
        _hub("phi3-mini-128k", "microsoft/Phi-3-mini-128k-instruct", "Phi3ForCausalLM", 3.8),  # 128k longrope
        # 7B, remote code, tiktoken tokenizer
        _hub("phi3-small-8k", "microsoft/Phi-3-small-8k-instruct", "Phi3SmallForCausalLM", 7.0),
        _hub("phi3-medium-4k", "microsoft/Phi-3-medium-4k-instruct", "Phi3ForCausalLM", 14.0),  # 14B, 4k, GQA
        _hub("phi3-medium-128k", "microsoft/Phi-3-medium-128k-instruct", "Phi3ForCausalLM", 14.0),  # longrope, GQA
        _hub("phi35", "microsoft/Phi-3.5-mini-instruct", "Phi3ForCausalLM", 3.8),  # 3.8B, 128k longrope
        _hub("phi35-moe", "microsoft/Phi-3.5-MoE-instruct", "PhiMoEForCausalLM", 42.0),  # 42B MoE, 6.6B active
        _hub("phi4", "microsoft/phi-4", "Phi3ForCausalLM", 14.7),  # 14B, 16k context, BPE tokenizer
        # 3.8B, 128k longrope, partial rotary, tied embeddings, BPE tokenizer
        _hub("phi4-mini", "microsoft/Phi-4-mini-instruct", "Phi3ForCausalLM", 3.8),
        _hub("phi4-mini-reasoning", "microsoft/Phi-4-mini-reasoning", "Phi3ForCausalLM", 3.8),  # 3.8B reasoning
        _hub("phi4-reasoning", "microsoft/Phi-4-reasoning", "Phi3ForCausalLM", 14.7),  # 14B reasoning, 32k context
        # 4.2B: Phi-3.5-mini and a CLIP ViT-L/14 image encoder with HD crops; remote code only (phi3_v)
        _hub("phi35-vision", "microsoft/Phi-3.5-vision-instruct", "Phi3VForCausalLM", 4.2),
        # 5.6B: Phi-4-mini, a SigLIP image encoder, a speech encoder and LoRA adapters for both. Its main branch is
        # the repository's own layout (phi4mm, remote code); transformers' native Phi4MultimodalForCausalLM reads
        # the converted layout, which phibuild builds without remote code (phi4-multimodal-tiny has it).
        _hub("phi4-multimodal", "microsoft/Phi-4-multimodal-instruct", "Phi4MMForCausalLM", 5.6),
        # Embedded look-alikes, shipped in the package (tools/make_embedded_models.py):
        _embedded("phi3-tiny"),  # Phi-3-mini-4k: SentencePiece, no rope scaling
        _embedded("phi35-tiny"),  # Phi-3.5-mini: SentencePiece, longrope
        _embedded("phi4-mini-tiny"),  # Phi-4-mini: BPE, GQA, partial rotary 0.75, tied embeddings
        # Phi-4-multimodal in transformers' native layout: phi4-mini-tiny's decoder, tiny image and audio encoders
        _embedded("phi4-multimodal-tiny", "Phi4MultimodalForCausalLM"),
    )
}

EMBEDDED = [name for name, spec in CATALOG.items() if spec.embedded]
EMBEDDED_TEXT = [name for name in EMBEDDED if CATALOG[name].architecture not in VISION_ARCHITECTURES]
EMBEDDED_VISION = [name for name in EMBEDDED if CATALOG[name].architecture in VISION_ARCHITECTURES]
HUB = [name for name, spec in CATALOG.items() if spec.repo]


def download_note(spec: ModelSpec) -> str:
    """What building a hub model for the first time downloads, said without asking the hub."""
    size = f", about {spec.parameters * 2:.0f} GB: {spec.parameters:g} billion parameters in bfloat16" if (
        spec.parameters) else ""
    return f"{spec.repo} at revision {spec.revision or 'main'} (resolved to a commit and pinned when built{size})"


def lookup(name: str, custom: dict[str, ModelSpec] | None = None) -> ModelSpec:
    """The spec for ``name``, from the project's own models first, then the catalog."""
    if custom and name in custom:
        return custom[name]
    if name in CATALOG:
        return CATALOG[name]
    known = sorted(set(CATALOG) | set(custom or ()))
    raise ConfigError(
        f"unknown model {name!r}. Known models: {', '.join(known)}. "
        "Define your own under [tool.phibuild.model.NAME] with path = ... or repo = ..."
    )
