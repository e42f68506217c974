"""Write ``phibuild/eval/heldout.txt``: the evaluation text of the fidelity step, disjoint from the corpus.

Python standard-library docstrings, in the corpus's chat format, of functions and classes whose docstrings the
training corpus (``tools/corpus.txt``) does not contain: the embedded models are evaluated on text of the kind
they learned, but not on text they learned. Run with the interpreter the corpus was made with (3.11); the
output is committed, so a later Python's docstrings do not change it.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tools" / "corpus.txt"
OUTPUT = ROOT / "phibuild" / "eval" / "heldout.txt"
MODULES = ("fractions", "statistics", "heapq", "bisect", "textwrap", "difflib", "calendar", "colorsys",
           "shlex", "fnmatch", "ipaddress", "decimal", "graphlib", "zoneinfo", "secrets", "uuid")
SIZE = 24_000  # characters: more than 2 x 1025 tokens of the embedded tokenizers


def docstrings(corpus: str):
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name, member in sorted(vars(module).items()):
            if name.startswith("_") or getattr(member, "__module__", None) != module_name:
                continue
            methods = sorted(vars(member).items()) if inspect.isclass(member) else []
            members = [(name, member)] + [(f"{name}.{m}", f) for m, f in methods if not m.startswith("_")]
            for qualname, item in members:
                doc = inspect.getdoc(item)
                if doc and len(doc) >= 120 and doc[:60] not in corpus:
                    yield f"{module_name}.{qualname}", doc


def main() -> None:
    corpus = CORPUS.read_text()
    turns, size = [], 0
    for name, doc in docstrings(corpus):
        turn = f"<|user|>\nWhat does {name} do?<|end|>\n<|assistant|>\n{doc}<|end|>\n"
        turns.append(turn)
        size += len(turn)
        if size >= SIZE:
            break
    OUTPUT.write_text("".join(turns))
    print(f"wrote {OUTPUT}: {len(turns)} docstrings, {size} characters")


if __name__ == "__main__":
    main()
