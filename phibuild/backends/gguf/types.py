"""What the GGUF backend and its converter share: the architectures, the converter's outputs and llama.cpp's
file types. Light on purpose (``gguf`` is imported only to look a type up), so listing tasks stays fast."""

from __future__ import annotations

MODEL = "model.gguf"
BASES = ("f16", "f32", "bf16", "q8_0")  # what our converter writes
# Hugging Face architectures our converter handles -> llama.cpp's architecture.
ARCHITECTURES = {
    "Phi3ForCausalLM": "phi3",
    "PhiMoEForCausalLM": "phimoe",
    "PhimoeForCausalLM": "phimoe",  # as transformers 5 writes it
}
# llama.cpp file types that quantize without an importance matrix (the IQ1/IQ2/IQ3 ones need one).
TYPES = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_1",
         "Q4_0", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K", "IQ4_NL", "IQ4_XS")


def file_type(kind: str) -> int:
    """llama.cpp's file type number for a type name such as Q4_K_M or F16."""
    import gguf

    return gguf.LlamaFileType["ALL_F32" if kind == "F32" else f"MOSTLY_{kind}"]
