"""The fidelity step's computations, run in a toolchain's worker (``phibuild.work``): the reference in the
fidelity toolchain's float32 transformers, and the measurement in the artifact's own runtime, compared there
with the reference (numpy, which doit's side does not need)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from . import reading
from .backends import CannotRun, Job, get
from .errors import BuildError, ConfigError

BUCKETS = 16  # the per-position view: mean KL over this many equal spans of a window's positions
DECODE_PROMPT = 64  # decode speed: greedy tokens generated one at a time after a prompt of this many tokens
DECODE_TOKENS = 32
METRICS = "metrics.json"


def reference(source: str, remote: bool, text: str, windows: int, length: int, vision: bool, output: Path) -> None:
    """transformers' float32 log-probabilities over the evaluation windows, and the windows' token ids:
    tokens.npy and logprobs.npy in ``output``."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(source, trust_remote_code=remote)(
        reading.read_text(Path(text), "evaluation text"), add_special_tokens=False)["input_ids"]
    needed = windows * (length + 1)
    if len(ids) < needed:
        raise ConfigError(f"the evaluation text {text} is {len(ids)} tokens long for this model; "
                          f"{windows} windows of {length} need {needed}")
    tokens = np.array(ids[:needed], dtype=np.int32).reshape(windows, length + 1)
    if vision:
        logits = _after_image_prompt(source, remote, tokens[:, :-1])
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, trust_remote_code=remote)
        with torch.no_grad():
            logits = model(torch.from_numpy(tokens[:, :-1]).long()).logits
    logprobs = torch.log_softmax(logits.double(), dim=-1).float().numpy()
    np.save(output / "tokens.npy", tokens)
    np.save(output / "logprobs.npy", logprobs)


def _after_image_prompt(source: str, remote: bool, windows: Any) -> Any:
    """Logits of each window's tokens following the image prompt (``backends.image_prompt``), [windows, length,
    vocab]. Eager attention: with SDPA, transformers 5.5's Phi-4-multimodal vision encoder runs causally on a
    crop without padding (its attention is marked causal and an all-ones mask is dropped), which no runtime does."""
    import torch
    from transformers import AutoModelForCausalLM, AutoProcessor

    from .backends import image_prompt

    prompt = image_prompt.inputs(AutoProcessor.from_pretrained(source, trust_remote_code=remote))
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, trust_remote_code=remote,
                                                 attn_implementation="eager")
    start = prompt["input_ids"].shape[1]
    with torch.no_grad():
        return torch.stack([model(**image_prompt.followed_by(prompt, window)).logits[0, start:]
                            for window in windows.tolist()])


def measure(backend: str, artifact: Path, job: Job, reference: Path, output: Path) -> None:
    """The runtime's logits for the reference's windows, compared with it, and its decoding speed: metrics.json."""
    import numpy as np

    tokens = np.load(reference / "tokens.npy", allow_pickle=False)
    logprobs = np.load(reference / "logprobs.npy", mmap_mode="r", allow_pickle=False)
    try:
        runtime = get(backend).runtime(artifact, job)
    except CannotRun as exc:
        metrics: dict[str, Any] = {"runtime": get(backend).title, "not_run": str(exc)}
    else:
        start, logits = time.perf_counter(), []
        for window in tokens:
            logits.append(runtime.logits([int(token) for token in window[:-1]]))
        elapsed = time.perf_counter() - start
        prompt = [int(token) for token in tokens[0, :DECODE_PROMPT]]
        metrics = {"runtime": runtime.settings, **compare(logprobs, tokens, logits),
                   "prefill_tps": tokens[:, 1:].size / elapsed,
                   "decode_tps": runtime.decode(prompt, DECODE_TOKENS)}
    (output / METRICS).write_text(json.dumps(metrics, indent=1, sort_keys=True) + "\n")


def compare(logprobs: Any, tokens: Any, logits: list[Any]) -> dict[str, Any]:
    """Figures of an artifact's logits (one [length, vocab] array per window) against the reference's
    log-probabilities ([windows, length, vocab]) on the windows' token ids ([windows, length + 1]).

    The standard error treats positions as independent; neighbouring positions are not, so it is a lower bound.
    """
    import numpy as np

    _, length, vocab = logprobs.shape
    kl, agree, nll, nll_reference = [], [], [], []
    for index, got in enumerate(logits):
        if got.shape != (length, vocab):
            raise BuildError(f"the runtime gave logits of shape {got.shape} for a window of {length} tokens over "
                             f"a vocabulary of {vocab}")
        p_log = np.asarray(logprobs[index], dtype=np.float64)
        q = got.astype(np.float64)
        peak = q.max(axis=-1, keepdims=True)
        q_log = q - peak - np.log(np.exp(q - peak).sum(axis=-1, keepdims=True))
        kl.append(np.maximum((np.exp(p_log) * (p_log - q_log)).sum(axis=-1), 0.0))
        agree.append(p_log.argmax(axis=-1) == q_log.argmax(axis=-1))
        following = tokens[index, 1:]
        nll.append(-q_log[np.arange(length), following])
        nll_reference.append(-p_log[np.arange(length), following])
    kl_all, quarter = np.stack(kl), max(1, length // 4)
    return {
        "tokens": int(kl_all.size),
        "kl": float(kl_all.mean()),
        "kl_se": float(kl_all.std() / math.sqrt(kl_all.size)),
        "kl_early": float(kl_all[:, :quarter].mean()),
        "kl_late": float(kl_all[:, -quarter:].mean()),
        "kl_by_position": [float(span.mean()) for span in np.array_split(kl_all, min(BUCKETS, length), axis=1)],
        "top1": float(np.stack(agree).mean()),
        "ppl": float(np.exp(np.stack(nll).mean())),
        "ppl_reference": float(np.exp(np.stack(nll_reference).mean())),
    }
