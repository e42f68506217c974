"""Shared helpers: throwaway phibuild projects, doit run in-process, reference logits from transformers.

doit runs in this process (``run_doit``) so that torch and the backends are imported once per session and
``phibuild.hashing.bytes_read`` shows what a run read; the few tests about processes (SIGKILL, ``doit -n``)
start their own.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib.util
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

# The suite writes nothing outside its temporary directories but the toolchains' environments, which it shares
# with every project on the machine (made on first use, reused by later runs) and uv's cache they come from. The
# toolchains' caches and telemetry (ONNX Runtime's event database under ~/.cache, OpenVINO's ~/intel) go to a
# home of its own, removed at the end, and ONNX Runtime is told not to collect events at all. Set before any
# toolchain is imported, and inherited by subprocesses.
_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
os.environ.setdefault("PHIBUILD_TOOLCHAINS", str(_CACHE / "phibuild" / "toolchains"))
os.environ.setdefault("UV_CACHE_DIR", str(_CACHE / "uv"))
HOME = tempfile.mkdtemp(prefix="phibuild-tests-home-")
os.environ["HOME"] = HOME
os.environ["ORT_DISABLE_TELEMETRY"] = "1"
atexit.register(shutil.rmtree, HOME, ignore_errors=True)

import pytest  # noqa: E402
from fakehub import FakeHub  # noqa: E402

from phibuild import hashing, tasks  # noqa: E402
from phibuild.catalog import EMBEDDED_DIR  # noqa: E402
from phibuild.lockfile import Lockfile  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PROMPT = "<|user|>\nWhat does os.path.join do?<|end|>\n<|assistant|>\n"


@dataclass
class Run:
    code: int
    output: str
    bytes_read: int  # hashed by phibuild
    weight_opens: int = 0  # .safetensors files opened by Python code

    @property
    def built(self) -> list[str]:
        """Names of what this run built (targets and intermediates), in order."""
        return re.findall(r"^phibuild: building (\S+):", self.output, re.MULTILINE)

    @property
    def restored(self) -> list[str]:
        return re.findall(r"^phibuild: (\S+): restored from the store", self.output, re.MULTILINE)


def write_project(root: Path, models: list[str], backends: list[str], precisions: list[str], *,
                  local: dict[str, Path] | None = None, store: Path | None = None, extra: str = "") -> Path:
    """A project directory whose ``pyproject.toml`` selects these models, backends and precisions.

    ``local`` names models of the project's own (``[tool.phibuild.model.NAME] path = ...``); ``store``
    points several projects at one store, so a key built by one is restored by the others.
    """
    root.mkdir(parents=True, exist_ok=True)
    text = (
        "[tool.phibuild]\n"
        f"models = {json.dumps(models)}\n"
        f"backends = {json.dumps(backends)}\n"
        f"precisions = {json.dumps(precisions)}\n"
    )
    if store:
        text += f"store = {json.dumps(str(store))}\n"
    text += extra
    for name, path in (local or {}).items():
        text += f"\n[tool.phibuild.model.{name}]\npath = {json.dumps(str(path))}\n"
    (root / "pyproject.toml").write_text(text)
    return root


def lock_of(root: Path, name: str = "artifacts.lock") -> dict[str, dict]:
    """A project's lock as its tables read, one dict per artifact, with the entry's toolchain versions under
    "versions" (the file refers to the toolchain by id)."""
    return {target: {**entry.to_dict(), "versions": entry.parts.toolchain.packages}
            for target, entry in Lockfile(root / name).read().artifacts.items()}


def copy_model(name: str, destination: Path) -> Path:
    """A writable copy of an embedded model, for tests that change its files."""
    shutil.copytree(EMBEDDED_DIR / name, destination)
    return destination


def _count_weight_opens(event: str, args: tuple) -> None:
    """Audit hook: every open() of a .safetensors file by Python code in this process, hashing or not."""
    global weight_opens
    if event == "open" and isinstance(args[0], str | Path) and str(args[0]).endswith(".safetensors"):
        weight_opens += 1


weight_opens = 0
sys.addaudithook(_count_weight_opens)


def run_doit(root: Path, *args: str) -> Run:
    """``doit ARGS`` in ``root`` in this process, as a fresh doit invocation would see the project; its
    output (stdout and stderr) and the weight bytes and files it read."""
    bytes_before, opens_before = hashing.bytes_read, weight_opens
    output = io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        code = tasks.run(root, *args)
    return Run(code, output.getvalue(), hashing.bytes_read - bytes_before, weight_opens - opens_before)


def doit_process(root: Path, *args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    """``python -m doit ARGS`` as a separate process in ``root``, using the repository's dodo.py."""
    env = {**(env or os.environ), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), "-d", str(root), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, **kwargs)


def prompt_for(model: str) -> str:
    """The smoke prompt in an embedded model's own chat format (Phi-4-mini has no newline after role markers)."""
    return PROMPT.replace("|>\n", "|>") if model.startswith("phi4") else PROMPT


def closed_port() -> int:
    """A loopback port nothing listens on: connecting to it is refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tiny_phimoe(directory: Path, *, hidden: int, intermediate: int, short_factor: list[float],
                long_factor: list[float], mscale: float, dtype: str = "bfloat16") -> Path:
    """A random Phi-3.5-MoE look-alike (attention and LM-head biases, GQA, 4 experts routed top 2, LongRoPE),
    with phi35-tiny's tokenizer and the hub checkpoint's architecture name. transformers 5 saves its RoPE
    settings in ``rope_parameters`` only; head size is hidden / 4, so the factors have hidden / 8 entries."""
    import torch
    from transformers import PhimoeConfig, PhimoeForCausalLM

    phi35 = EMBEDDED_DIR / "phi35-tiny"
    base = json.loads((phi35 / "config.json").read_text())
    config = PhimoeConfig(
        vocab_size=base["vocab_size"], bos_token_id=base["bos_token_id"], eos_token_id=base["eos_token_id"],
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, attention_bias=True, lm_head_bias=True,
        max_position_embeddings=131072, original_max_position_embeddings=4096,
        rope_scaling={"type": "longrope", "short_factor": short_factor,
                      "long_factor": long_factor, "short_mscale": mscale, "long_mscale": mscale,
                      "original_max_position_embeddings": 4096},
    )
    torch.manual_seed(0)
    PhimoeForCausalLM(config).to(getattr(torch, dtype)).save_pretrained(directory)
    settings = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**settings, "architectures": ["PhiMoEForCausalLM"]}, indent=2))
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(phi35 / name, directory / name)
    return directory


@functools.cache
def reference_logits(model_dir: Path, prompt: str = PROMPT):
    """Next-token logits of the Hugging Face checkpoint in float32, as the ground truth for exports
    (computed once per checkpoint and prompt)."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = _float32_model(model_dir)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    return ids[0].tolist(), logits.numpy()


def top2_margin(logits) -> float:
    """How far the most likely next token is ahead of the second: below float rounding, argmax is a coin toss."""
    import numpy as np

    first, second = np.sort(np.asarray(logits, dtype=np.float64))[-2:][::-1]
    return float(first - second)


def assert_same_choice(got, expected, min_margin: float = 0.05) -> None:
    """Both logit vectors pick the same next token, asserted only where the reference's choice is clear."""
    import numpy as np

    assert top2_margin(expected) >= min_margin, "a near tie: comparing argmax here would test float rounding"
    assert int(np.argmax(got)) == int(np.argmax(expected))


def greedy_agreement(model_dir: Path, prompt_ids: list[int], tokens: list[int], min_margin: float = 0.1) -> int:
    """Teacher-forced check of a runtime's greedy tokens against transformers in float32: at each step the
    reference sees the runtime's own prefix, and where its top-2 margin is at least ``min_margin`` the runtime
    must have taken the reference's choice. Returns how many steps were that clear (a near tie proves
    nothing either way, since other kernels may round it the other way)."""
    import numpy as np
    import torch

    model = _float32_model(model_dir)
    clear = 0
    with torch.no_grad():
        logits = model(torch.tensor([list(prompt_ids) + list(tokens)])).logits[0].numpy()
    for step, token in enumerate(tokens):
        reference = logits[len(prompt_ids) + step - 1]
        if top2_margin(reference) >= min_margin:
            clear += 1
            assert token == int(np.argmax(reference)), f"step {step}: {token}, transformers {np.argmax(reference)}"
    return clear


@functools.cache
def _float32_model(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def use_endpoint(url: str, home: Path, monkeypatch: pytest.MonkeyPatch, **env: str) -> None:
    """Point huggingface_hub at ``url``, caching under ``home`` (and with ``env`` set), as if the variables had
    been set before it was imported: it reads them once, into ``huggingface_hub.constants``, so that module is
    re-run under the new environment and every value that differs is patched into the loaded one."""
    from huggingface_hub import constants

    for name in ("HF_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_XET"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "5")  # loopback answers in milliseconds; never wait long
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "5")
    spec = importlib.util.find_spec("huggingface_hub.constants")
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    for name, value in vars(fresh).items():
        if not (callable(value) or isinstance(value, ModuleType)) and getattr(constants, name, None) != value:
            monkeypatch.setattr(constants, name, value)


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A fake hub on loopback, which huggingface_hub talks to for the test."""
    with FakeHub() as server:
        use_endpoint(server.url, tmp_path / "hf", monkeypatch)
        yield server


# -- a built world to break: tests/test_hostile.py, tests/test_safety.py ----------------------------------


@pytest.fixture(scope="session")
def origin(tmp_path_factory) -> Path:
    """Built once: the model, a project with a remote directory beside it, the remote filled."""
    top = tmp_path_factory.mktemp("world")
    copy_model("phi3-tiny", top / "model")
    root = world_project(top, "one")
    run = run_doit(root)
    assert run.code == 0, run.output
    return top


@pytest.fixture
def world(origin: Path, tmp_path: Path) -> Path:
    """A private copy of ``origin``: break it at will."""
    shutil.copytree(origin, tmp_path / "world", symlinks=True)
    for path in (tmp_path / "world").rglob("*"):  # store files are read-only; these are copies of our own
        if path.is_file() and not path.is_symlink():
            path.chmod(0o644)
    return tmp_path / "world"


def world_project(top: Path, name: str, model: Path | None = None, extra: str = "", remote: str = "../remote",
                  backends: tuple[str, ...] = ("onnx", "gguf")) -> Path:
    """A project in ``top/name`` building model "a" (by default ``top/model``, named by a relative path, so
    that copies of ``top`` have the same lock) at int4."""
    settings = (f"remote = {json.dumps(remote)}\nremote_timeout = 2\n" if remote else "") + extra
    path = json.dumps(str(model) if model else "../model")
    return write_project(top / name, ["a"], list(backends), ["int4"],
                         extra=f"{settings}\n[tool.phibuild.model.a]\npath = {path}\n")
