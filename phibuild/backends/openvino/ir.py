"""OpenVINO IR as phibuild makes it, shared by the text build (``__init__``) and the vision build (``vision.py``):
optimum-intel's export, NNCF's weight compression and the rewrites that make an IR the same bytes every time
(see ``__init__`` for what and why)."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import BuildError, file_system_error
from .. import Job, replaced

if TYPE_CHECKING:
    from optimum.intel import OVWeightQuantizationConfig

TITLE = "OpenVINO"
TASK = "text-generation-with-past"
# The IRs a model directory needs for openvino_genai.LLMPipeline; the exporter only warns when the
# tokenizer conversion fails, so the build checks for them.
IRS = ("openvino_model", "openvino_tokenizer", "openvino_detokenizer")
# A name OpenVINO made up from its process-wide node counter, or one derived from it: Constant_193436,
# Constant_193436_compressed, Convert_135411.0, Constant_12655/scale.
COUNTER_NAME = re.compile(r"(?P<kind>[A-Za-z][A-Za-z0-9]*)_\d+(?![A-Za-z0-9])")
# NNCF computes compressed weights, and the quantization errors by which ratio < 1 ranks layers for int4, with
# small OpenVINO models compiled for this CPU, or with numpy. The compressed values agree, but the ranking's
# means are summed in an order that depends on the instruction set (a near-tie can flip between CPUs); numpy's
# do not. Measured on a Phi-3-mini-sized layer: 15% slower.
NUMPY_COMPRESSION = "NNCF_DISABLE_OPTIMIZED_COMPRESSION"

def weight_config(precision: str, params: dict[str, Any]) -> OVWeightQuantizationConfig | None:
    """optimum-intel's weight compression config for ``precision``, or None for fp16/fp32."""
    from optimum.intel import OVWeightQuantizationConfig

    if precision == "int4":
        return OVWeightQuantizationConfig(bits=4, sym=params["sym"], group_size=params["group_size"],
                                          ratio=params["ratio"], backup_precision=params["backup_precision"],
                                          all_layers=params["all_layers"],
                                          quant_method="awq" if params["awq"] else "default")
    if precision == "int8":
        return OVWeightQuantizationConfig(bits=8, sym=params["sym"], group_size=-1, ratio=1.0)
    return None


FP16, FP16_ROTARY = "fp16", "fp16 keeping the rotary constants in f32"  # what _rewrite does to an IR's weights


def export(job: Job, task: str, weights: OVWeightQuantizationConfig | None,
           patches: contextlib.AbstractContextManager, irs: tuple[str, ...]) -> None:
    """optimum-intel's export of ``job.source`` for ``task`` into ``job.output``, tokenizer IRs included, inside
    ``patches``; its failures, and an IR of ``irs`` it did not write, said as the build's. With ``weights`` (int4,
    int8) the model is exported at the checkpoint's dtype, for _rewrite to compress; without (fp16, fp32), in
    float32 (fp16 is compressed by _rewrite, which keeps the rotary constants in f32)."""
    from optimum.exporters.openvino import main_export
    from optimum.intel import OVConfig

    ov_config = OVConfig(quantization_config=weights) if weights else OVConfig(dtype="fp32")

    try:
        with quiet(), patches:
            main_export(str(job.source), job.output, task=task, ov_config=ov_config, convert_tokenizer=True,
                        library_name="transformers", local_files_only=True, trust_remote_code=job.trust_remote_code)
    except OSError as exc:
        raise file_system_error(exc, f"{TITLE} export of {job.source}") from exc
    except Exception as exc:
        raise BuildError(f"{TITLE} export of {job.source} failed: {type(exc).__name__}: {exc}") from exc
    missing = [f"{stem}{suffix}" for stem in irs for suffix in (".xml", ".bin")
               if not (job.output / f"{stem}{suffix}").is_file()]
    if missing:
        raise BuildError(f"{TITLE} export wrote no {', '.join(missing)} in {job.output} "
                         "(the tokenizer conversion needs openvino-tokenizers and a tokenizer.json)")


def rewrite(directory: Path, steps: dict[str, Any], compressing: bool) -> None:
    """``_rewrite`` in a scratch directory beside ``directory``, its failures said as the build's."""
    try:
        _rewrite(directory, steps, directory.parent / "rewrite")
    except OSError as exc:
        raise file_system_error(exc, f"{TITLE}: writing the IR") from exc
    except Exception as exc:
        what = "NNCF weight compression" if compressing else "rewriting the IR"
        raise BuildError(f"{TITLE}: {what} failed: {type(exc).__name__}: {exc}") from exc


def _rewrite(directory: Path, steps: dict[str, Any], scratch: Path) -> None:
    """Compress each IR's weights as ``steps`` says (for each IR stem: an optimum-intel weight config, run by NNCF;
    FP16 or FP16_ROTARY; or None), then renumber counter-made names in it.

    OpenVINO names a node nobody named after a process-wide counter (``Constant_193436``, ``Model96``), so
    the XML of the same build would depend on what the process did before: another export, or NNCF compiling
    helper models on this CPU. The order those names first appear in in the graph does not.
    """
    import nncf
    import openvino
    import openvino_tokenizers  # noqa: F401  (lets openvino.Core read the tokenizer operations)
    from nncf.common.utils.helpers import set_env_variable
    from openvino._offline_transformations import compress_model_transformation

    core = openvino.Core()
    scratch.mkdir()
    for stem, step in steps.items():
        model = core.read_model(directory / f"{stem}.xml")
        if step == FP16_ROTARY:
            _fp16_keeping_rotary(model)
        elif step == FP16:
            compress_model_transformation(model)
        elif step is not None:
            with set_env_variable(NUMPY_COMPRESSION, "1"):
                model = nncf.compress_weights(model, **step.to_nncf_dict())
        _renumber(model, stem)
        openvino.save_model(model, scratch / f"{stem}.xml", compress_to_fp16=False)
        del model  # the original .bin is memory-mapped until then
        for suffix in (".xml", ".bin"):
            os.replace(scratch / f"{stem}{suffix}", directory / f"{stem}{suffix}")
    scratch.rmdir()


def _fp16_keeping_rotary(model) -> None:
    """Compress the model's f32 constants to f16 (``compress_model_transformation``, what optimum-intel runs to
    compress an IR), then put back in f32 those the rotary angles are computed from (the frequencies, LongRoPE's
    factors and scale). In f16 a frequency is off by up to 2**-11 of itself, and so is the angle at every
    position: measured on phi4-mini-tiny, the KL of the last quarter of a 1024-token window was 80 times the
    first's (4.4e-3 against 5.6e-5). OpenVINO's own exemption (the ``precise`` runtime attribute) is not
    honoured for attributes set from Python, so the constants are replaced after the compression."""
    import openvino.opset13 as ops
    from openvino._offline_transformations import compress_model_transformation

    exact = {node.get_friendly_name(): node.get_data().copy() for node in _rotary_constants(model)}
    compress_model_transformation(model)
    kept = set()
    for op in model.get_ordered_ops():  # a compressed constant is an f16 Constant and a Convert of its name
        name = op.get_friendly_name()
        if op.get_type_name() == "Convert" and name in exact:
            constant = ops.constant(exact[name])
            constant.set_friendly_name(name)
            op.output(0).replace(constant.output(0))
            kept.add(name)
        elif op.get_type_name() == "Constant" and name in exact:  # one the compression left alone
            kept.add(name)
    if not exact or kept != set(exact):
        raise BuildError(f"after the fp16 compression, {len(set(exact) - kept)} of the {len(exact)} rotary constants "
                         "cannot be found to keep in f32: OpenVINO compresses differently than phibuild expects; "
                         "nothing was published")


def _rotary_constants(model) -> list:
    """The f32 constants the model's Sin and Cos nodes are computed from."""
    import openvino

    seen, found = set(), []
    pending = [op for op in model.get_ordered_ops() if op.get_type_name() in ("Sin", "Cos")]
    while pending:
        for source in (port.get_source_output().get_node() for port in pending.pop().inputs()):
            if source.get_friendly_name() in seen:
                continue
            seen.add(source.get_friendly_name())
            pending.append(source)
            if source.get_type_name() == "Constant" and source.get_output_element_type(0) == openvino.Type.f32:
                found.append(source)
    return found


def _renumber(model, stem: str) -> None:
    """Replace counter values in node and tensor names by the order they first appear in in the graph."""
    numbers: dict[str, str] = {}

    def renumber(name: str) -> str:
        match = COUNTER_NAME.match(name)
        if not match:
            return name
        return numbers.setdefault(match[0], f"{match['kind']}_{len(numbers)}") + name[match.end():]

    def counter(name: str) -> tuple[int, str]:
        match = COUNTER_NAME.match(name)
        return (int(match[0].rsplit("_", 1)[1]) if match else -1, name)

    for op in model.get_ordered_ops():
        op.set_friendly_name(renumber(op.get_friendly_name()))
        for output in op.outputs():
            names = output.get_names()
            new = {renumber(name) for name in sorted(names, key=counter)}
            if new != names:
                output.get_tensor().set_names(new)
    if re.fullmatch(r"Model\d+", model.get_friendly_name()):
        model.set_friendly_name(stem)


@contextlib.contextmanager
def reference_rope() -> Iterator[None]:
    """transformers' default rotary frequencies for Phi-3 (``1 / theta ** (2i / dim)``), which the export stores
    as a constant, with the power correctly rounded (reference.py) instead of computed by torch's CPU-dispatched
    pow: measured, a Phi-3 shape with theta 50000 stored a constant one ulp apart under torch's AVX-512 and
    scalar kernels. LongRoPE models rebuild their frequencies in the graph, which OpenVINO folds exactly."""
    import torch
    from transformers.models.phi3 import modeling_phi3

    from ..reference import pow_f32  # here: numpy is not imported to list tasks

    rotary = modeling_phi3.Phi3RotaryEmbedding
    original = rotary.__dict__["compute_default_rope_parameters"]

    def compute(config=None, device=None, seq_len=None):
        theirs, attention_factor = original.__func__(config, device, seq_len)
        if theirs.is_meta:  # a model is first made on the meta device, holding no values; these come later
            return theirs, attention_factor
        cpu = torch.device("cpu")
        base = config.rope_parameters["rope_theta"]
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dim = int(head_dim * config.rope_parameters.get("partial_rotary_factor", 1.0))
        exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=cpu).float() / dim
        mine = 1.0 / torch.from_numpy(pow_f32(base, exponents.numpy()))
        if mine.shape != theirs.shape or not torch.allclose(mine, theirs.to(cpu), rtol=1e-5, atol=0):
            raise BuildError("transformers no longer computes Phi-3's rotary frequencies as phibuild reproduces "
                             "them (a newer transformers?); nothing was published")
        return mine.to(device=device), attention_factor

    with replaced(rotary, compute_default_rope_parameters=staticmethod(compute)):
        yield


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence what an export says about model code (tracer and deprecation warnings, weight loading bars)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    torch_logger = logging.getLogger("torch.utils.cpp_extension")  # "No CUDA runtime is found" on CPU machines
    torch_level = torch_logger.level
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        torch_logger.setLevel(torch_level)
