"""The ONNX Runtime GenAI model builder as phibuild runs it, shared by the text build (``__init__``) and the
vision build (``vision.py``): in-process, its CPU-dependent steps made the same on every CPU, int4 and int8
quantized one weight at a time (``quantize.py``)."""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ...errors import BuildError
from .. import Job, replaced
from .quantize import one_weight_at_a_time

TITLE = "ONNX Runtime GenAI"


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

    from ..reference import cos_sin_f32, log_f64, pow_f32  # here: numpy is not imported to list tasks

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
