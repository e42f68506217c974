"""The image prompt of the multimodal checks, as transformers' processor lays it out: the chat prompt asking
``SMOKE_QUESTION`` about ``SMOKE_IMAGE``, the image marked by the processor's own image token and expanded by it
into the image's tokens. The fidelity reference, optimum-intel's runtime and the parity tests all start from it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import SMOKE_IMAGE, SMOKE_QUESTION


def inputs(processor: Any, image: Path = SMOKE_IMAGE) -> Any:
    """The processor's tensors (``input_ids``, pixel values, image sizes and masks) for the image prompt (with
    another ``image`` in its place, for tests)."""
    from PIL import Image

    tokenizer = processor.tokenizer
    text = tokenizer.apply_chat_template([{"role": "user", "content": f"{tokenizer.image_token}{SMOKE_QUESTION}"}],
                                         add_generation_prompt=True, tokenize=False)
    with Image.open(image) as picture:
        return processor(text=text, images=[picture.convert("RGB")], return_tensors="pt")


def followed_by(prompt: Any, ids: Any) -> dict[str, Any]:
    """``prompt``'s tensors with the token ids ``ids`` (a sequence) after its own, attended to throughout."""
    import torch

    more = torch.as_tensor([list(ids)], dtype=prompt["input_ids"].dtype)
    input_ids = torch.cat([prompt["input_ids"], more], dim=1)
    return {**prompt, "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
