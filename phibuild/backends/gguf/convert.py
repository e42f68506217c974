"""Hugging Face Phi checkpoints to GGUF, on the ``gguf`` package: llama.cpp's ``phi3`` and ``phimoe``.

llama-cpp-python ships no converter, so this is ours. It follows what llama.cpp's own
``convert_hf_to_gguf.py`` writes for Phi3 and PhiMoE (hyperparameters, longrope factor tensors and
attention factor, tokenizer), and llama.cpp's loader for what it reads (``llama-model.cpp``,
``llama-vocab.cpp``).

Tensors are streamed: the GGUF header and tensor infos come from the safetensors headers alone, then
each tensor is read, converted and written a few rows at a time. Peak memory is a chunk of rows (about
16 MB of float32), whatever the size of the model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import gguf
import numpy as np

from ... import sources
from ...errors import BuildError
from .types import ARCHITECTURES, BASES, file_type

Q = gguf.GGMLQuantizationType
MODEL_ARCH = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}  # "phi3" -> MODEL_ARCH.PHI3
# safetensors dtypes we read; numpy has no bfloat16, so bf16 tensors are mapped as their uint16 bits.
DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
# tokenizer.json pre-tokenizer regexes -> the name llama.cpp's llama-vocab.cpp knows that split by.
O200K = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CL100K = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {O200K: "gpt-4o", CL100K: "dbrx"}
EXPERT = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight")
CHUNK_ELEMENTS = 1 << 22  # rows converted at a time: about 16 MB of float32


def convert(source: Path, output: Path, outtype: str) -> None:
    """Write ``source`` (a Hugging Face checkpoint directory) as one GGUF file ``output``."""
    if outtype not in BASES:
        raise BuildError(f"GGUF converter output type must be one of {', '.join(BASES)}, not {outtype!r}")
    config = sources.read_config(source)
    architecture = config["architectures"][0]
    if architecture not in ARCHITECTURES:
        raise BuildError(f"the GGUF converter handles {', '.join(ARCHITECTURES)}, not {architecture}")
    arch = MODEL_ARCH[ARCHITECTURES[architecture]]
    checkpoint = Checkpoint(source)
    qtype = Q[outtype.upper()]
    rope = Rope.of(config)
    tensors = _plan(checkpoint, config, arch, qtype, rope)

    writer = gguf.GGUFWriter(output, gguf.MODEL_ARCH_NAMES[arch])
    _hyperparameters(writer, config, arch, rope)
    writer.add_file_type(file_type(outtype.upper()))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab_size = next(t.shape[0] for t in tensors if t.name == "token_embd.weight")
    _tokenizer(writer, source, vocab_size)
    for tensor in tensors:
        writer.add_tensor_info(tensor.name, tensor.stored_shape(), tensor.stored_dtype(), tensor.stored_nbytes(),
                               raw_dtype=tensor.qtype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in tensors:
            writer.write_tensor_data(Streamed(tensor.stored_nbytes(), tensor.chunks(checkpoint)))
    finally:
        writer.close()


# -- weights -------------------------------------------------------------------------------------


class Checkpoint:
    """The tensors of a safetensors checkpoint (one file or shards), read a few rows at a time."""

    def __init__(self, directory: Path) -> None:
        self.entries: dict[str, tuple[Path, str, tuple[int, ...], int]] = {}
        for path in sorted(directory.glob("*.safetensors")):
            length, header = sources.safetensors_header(path)
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if name in self.entries:
                    raise BuildError(f"tensor {name} is in both {self.entries[name][0].name} and {path.name}")
                if info["dtype"] not in DTYPES:
                    raise BuildError(f"{path.name}: tensor {name} is {info['dtype']}; the GGUF converter reads "
                                     f"{', '.join(DTYPES)} checkpoints (quantized checkpoints are not read)")
                self.entries[name] = (path, info["dtype"], tuple(info["shape"]), 8 + length + info["data_offsets"][0])

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][2]

    def rows(self, name: str, start: int, count: int) -> np.ndarray:
        """Rows ``start`` to ``start + count`` of tensor ``name`` seen as a matrix, read (not mapped: mapped
        pages would stay resident until the whole tensor is done)."""
        path, dtype, shape, offset = self.entries[name]
        width, itemsize = shape[-1], np.dtype(DTYPES[dtype]).itemsize
        return np.fromfile(path, DTYPES[dtype], count * width, offset=offset + start * width * itemsize
                           ).reshape(count, width)


def _float32(chunk: np.ndarray) -> np.ndarray:
    if chunk.dtype == np.uint16:  # bfloat16 bits: the high half of a float32
        bits = chunk.astype(np.uint32)
        bits <<= 16
        return bits.view(np.float32)
    return chunk.astype(np.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class Tensor:
    """One GGUF tensor: its Hugging Face sources (several when experts are stacked) or generated data."""

    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    sources: tuple[str, ...] = ()
    data: np.ndarray | None = None

    def stored_dtype(self) -> np.dtype:
        return np.dtype({Q.F32: np.float32, Q.F16: np.float16}.get(self.qtype, np.uint8))

    def stored_shape(self) -> tuple[int, ...]:
        if self.qtype in (Q.F32, Q.F16):
            return self.shape
        return gguf.quant_shape_to_byte_shape(self.shape, self.qtype)

    def stored_nbytes(self) -> int:
        return math.prod(self.stored_shape()) * self.stored_dtype().itemsize

    def chunks(self, checkpoint: Checkpoint) -> Iterator[np.ndarray]:
        """The tensor's bytes in GGUF order, converted a few rows at a time."""
        if self.data is not None:
            yield gguf.quantize(self.data, self.qtype)
            return
        width = self.shape[-1]
        step = max(1, CHUNK_ELEMENTS // width)
        for name in self.sources:
            rows = math.prod(checkpoint.shape(name)) // width
            for start in range(0, rows, step):
                yield gguf.quantize(_float32(checkpoint.rows(name, start, min(step, rows - start))), self.qtype)


@dataclasses.dataclass(frozen=True)
class Streamed:
    """What ``GGUFWriter.write_tensor_data`` is given: it asks an array only for ``nbytes`` and ``tofile`` (in
    the host's byte order, which GGUF's little-endian default is here), so a tensor is written as it is
    converted and never held whole."""

    nbytes: int
    parts: Iterator[np.ndarray]

    def tofile(self, handle: BinaryIO) -> None:
        written = 0
        for part in self.parts:
            part.tofile(handle)
            written += part.nbytes
        if written != self.nbytes:
            raise BuildError(f"the GGUF converter wrote {written} bytes of a tensor of {self.nbytes}")


def _plan(checkpoint: Checkpoint, config: dict, arch: gguf.MODEL_ARCH, qtype: gguf.GGMLQuantizationType,
          rope: Rope) -> list[Tensor]:
    """Every tensor of the GGUF, in a fixed order, with its GGUF name, shape and storage type."""
    blocks = config["num_hidden_layers"]
    names = gguf.get_tensor_name_map(arch, blocks)
    tensors = [Tensor(gguf.TENSOR_NAMES[kind] + ".weight", factors.shape, Q.F32, data=factors)
               for kind, factors in rope.tensors()]
    planned: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = {}
    experts: dict[str, dict[int, str]] = {}
    for name in checkpoint.entries:
        if name.endswith(".rotary_emb.inv_freq"):  # a buffer older checkpoints saved; llama.cpp computes it
            continue
        match = EXPERT.fullmatch(name)
        if match:  # llama.cpp wants each layer's experts as one tensor per weight, stacked on a new first axis
            experts.setdefault(f"model.layers.{match[1]}.block_sparse_moe.experts.{match[3]}.weight", {})[
                int(match[2])] = name
        else:
            planned[name] = ((name,), checkpoint.shape(name))
    count = config.get("num_local_experts", 0)
    for stacked, found in experts.items():
        if sorted(found) != list(range(count)):
            raise BuildError(f"{stacked} has experts {sorted(found)}; config.json says there are {count}")
        sources = tuple(found[i] for i in range(count))
        planned[stacked] = (sources, (count, *checkpoint.shape(sources[0])))
    for name in sorted(planned, key=_natural):
        tensors.append(_tensor(names, name, *planned[name], qtype))
    return tensors


def _tensor(names: gguf.TensorNameMap, hf_name: str, sources: tuple[str, ...], shape: tuple[int, ...],
            qtype: gguf.GGMLQuantizationType) -> Tensor:
    name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise BuildError(f"checkpoint tensor {hf_name} has no llama.cpp name; is this a Phi checkpoint "
                         "transformers can load?")
    # As llama.cpp's converter does: vectors (norms, biases) and the MoE router stay F32, and Q8_0 falls
    # back to F16 for rows that are not a whole number of blocks.
    if len(shape) == 1 or name.endswith(".ffn_gate_inp.weight"):
        qtype = Q.F32
    elif shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        qtype = Q.F16
    return Tensor(name, shape, qtype, sources)


def _natural(name: str) -> list:
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split(".")]


# -- hyperparameters -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rope:
    """Rotary embedding settings from either ``rope_scaling`` (``type``) or ``rope_parameters`` (``rope_type``)."""

    theta: float
    dimensions: int
    context: int
    original_context: int
    long_factors: tuple[float, ...] = ()
    short_factors: tuple[float, ...] = ()
    attention_factor: float = 1.0

    @classmethod
    def of(cls, config: dict) -> Rope:
        params: dict[str, Any] = config.get("rope_parameters") or config.get("rope_scaling") or {}
        kind = params.get("rope_type") or params.get("type") or "default"
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
        context = config["max_position_embeddings"]
        original = (config.get("original_max_position_embeddings")
                    or params.get("original_max_position_embeddings") or context)
        rope = cls(theta=float(params.get("rope_theta", config.get("rope_theta", 10000.0))),
                   dimensions=int(head_dim * partial), context=context, original_context=original)
        if kind == "default":
            return rope
        if kind not in ("longrope", "su"):
            raise BuildError(f"rope type {kind!r} has no llama.cpp phi3 equivalent (it supports longrope)")
        long, short = tuple(params.get("long_factor") or ()), tuple(params.get("short_factor") or ())
        if not (len(long) == len(short) == rope.dimensions // 2):
            raise BuildError(f"longrope needs {rope.dimensions // 2} long and short factors (rotary dimensions "
                             f"{rope.dimensions} / 2); config.json has {len(long)} and {len(short)}")
        return dataclasses.replace(rope, long_factors=long, short_factors=short,
                                   attention_factor=_attention_factor(params, context / original, original))

    def tensors(self) -> Iterator[tuple[gguf.MODEL_TENSOR, np.ndarray]]:
        if self.long_factors:
            yield gguf.MODEL_TENSOR.ROPE_FACTORS_LONG, np.array(self.long_factors, dtype=np.float32)
            yield gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT, np.array(self.short_factors, dtype=np.float32)


def _attention_factor(params: dict, scale: float, original: int) -> float:
    """The cos/sin scale transformers applies with longrope. PhiMoE states it (``short_mscale`` /
    ``long_mscale``); otherwise it follows from the context extension, as in transformers and llama.cpp."""
    if params.get("attention_factor") is not None:
        return float(params["attention_factor"])
    if "short_mscale" in params or "long_mscale" in params:
        if params.get("short_mscale") != params.get("long_mscale"):
            raise BuildError("rope short_mscale and long_mscale differ; GGUF holds one attention factor for both")
        return float(params["short_mscale"])
    return math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0


def _hyperparameters(writer: gguf.GGUFWriter, config: dict, arch: gguf.MODEL_ARCH, rope: Rope) -> None:
    writer.add_context_length(rope.context)
    writer.add_rope_scaling_orig_ctx_len(rope.original_context)
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config.get("num_key_value_heads") or config["num_attention_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_dimension_count(rope.dimensions)
    writer.add_rope_freq_base(rope.theta)
    writer.add_sliding_window(config.get("sliding_window") or 0)  # 0: none (phi-4), as llama.cpp expects
    if rope.long_factors:
        writer.add_rope_scaling_attn_factors(rope.attention_factor)
    if arch == gguf.MODEL_ARCH.PHIMOE:
        writer.add_expert_count(config["num_local_experts"])
        writer.add_expert_used_count(config["num_experts_per_tok"])


# -- tokenizer -----------------------------------------------------------------------------------


def _tokenizer(writer: gguf.GGUFWriter, source: Path, vocab_size: int) -> None:
    """The vocabulary padded to the embedding rows, special token ids, add-BOS/EOS flags, chat template."""
    if not (source / "tokenizer.json").is_file():
        raise BuildError(f"{source} has no tokenizer.json, whose added tokens and pre-tokenizer the GGUF needs")
    spec = sources.read_json(source / "tokenizer.json")
    added = spec.get("added_tokens", [])
    bpe = not (source / "tokenizer.model").is_file()
    if not bpe:
        tokens, types, scores = _sentencepiece(source / "tokenizer.model", added, vocab_size)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_scores(scores)
    elif spec["model"].get("type") == "BPE" and "ByteLevel" in json.dumps(spec.get("decoder")):
        tokens, types = _byte_level_bpe(spec["model"]["vocab"], added, vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_tokenizer(spec.get("pre_tokenizer")))
    else:
        raise BuildError(f"{source} has neither a SentencePiece tokenizer.model nor a byte-level BPE tokenizer.json")
    duplicates = sorted(token for token, count in Counter(tokens).items() if count > 1)
    if duplicates:
        raise BuildError(f"the vocabulary has duplicate tokens, which llama.cpp cannot load: {duplicates[:5]}")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # llama.cpp gives the special tokens of a model whose name contains "phi3" Phi-3's rstrip (llama-vocab.cpp),
    # and those of no other model: so the name says Phi-3 exactly when the tokenizer's own tokens rstrip.
    writer.add_name("Phi-3" if any(token.get("rstrip") for token in added) else "Phi")

    special = gguf.SpecialVocab(source, load_merges=bpe, n_vocab=len(tokens))
    # SpecialVocab sets the flags only when tokenizer_config.json or the post-processor adds a token;
    # llama.cpp's default for a missing flag (BOS for SentencePiece) would differ from transformers.
    special.add_special_token.setdefault("bos", False)
    special.add_special_token.setdefault("eos", False)
    special.add_to_gguf(writer, quiet=True)


def _padded(count: int, size: int) -> tuple[list[str], list[int]]:
    if count > size:
        raise BuildError(f"the tokenizer has {count} tokens but the embedding only {size} rows")
    return [f"[PAD{i}]" for i in range(size)], [gguf.TokenType.UNUSED] * size


def _sentencepiece(path: Path, added: list[dict], vocab_size: int) -> tuple[list[str], list[int], list[float]]:
    from sentencepiece import SentencePieceProcessor

    processor = SentencePieceProcessor(model_file=str(path))
    pieces = processor.vocab_size()
    tokens, types = _padded(max([pieces, *(t["id"] + 1 for t in added)]), vocab_size)
    scores = [-10000.0] * vocab_size
    for i in range(pieces):
        tokens[i], scores[i] = processor.IdToPiece(i), processor.GetScore(i)
        types[i] = (gguf.TokenType.UNKNOWN if processor.IsUnknown(i) else
                    gguf.TokenType.CONTROL if processor.IsControl(i) else
                    gguf.TokenType.UNUSED if processor.IsUnused(i) else
                    gguf.TokenType.BYTE if processor.IsByte(i) else gguf.TokenType.NORMAL)
    for token in added:
        i = token["id"]
        if i < pieces and tokens[i] == token["content"] and types[i] != gguf.TokenType.NORMAL:
            continue  # SentencePiece's own <unk>, <s>, </s> keep their types
        tokens[i], scores[i], types[i] = token["content"], -1000.0, _added_type(token)
    return tokens, types, scores


def _byte_level_bpe(vocab: dict[str, int], added: list[dict], vocab_size: int) -> tuple[list[str], list[int]]:
    tokens, types = _padded(max([*vocab.values(), *(t["id"] for t in added)]) + 1, vocab_size)
    for token, i in vocab.items():
        tokens[i], types[i] = token, gguf.TokenType.NORMAL
    for token in added:
        tokens[token["id"]], types[token["id"]] = token["content"], _added_type(token)
    return tokens, types


def _added_type(token: dict) -> int:
    """A tokenizer.json added token: special ones are llama.cpp's CONTROL, the others USER_DEFINED."""
    return gguf.TokenType.CONTROL if token.get("special") else gguf.TokenType.USER_DEFINED


def _pre_tokenizer(pre: dict | None) -> str:
    """llama.cpp's name for the tokenizer.json split: GPT-2's (ByteLevel's own regex), o200k or cl100k."""
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    splits = [s["pattern"].get("Regex") for s in steps if s.get("type") == "Split"]
    if not splits and any(s.get("type") == "ByteLevel" and s.get("use_regex", True) for s in steps):
        return "gpt-2"
    if len(splits) == 1 and splits[0] in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[splits[0]]
    raise BuildError(f"tokenizer.json pre-tokenizer {json.dumps(pre)[:200]} matches none llama.cpp implements "
                     "here (GPT-2, o200k / gpt-4o, cl100k / dbrx)")
