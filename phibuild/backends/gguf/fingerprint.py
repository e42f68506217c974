"""A behavioural fingerprint of the llama.cpp quantizer that llama-cpp-python loads.

llama.cpp's quantizer (``ggml_quantize_chunk`` in libggml-base) does no run-time CPU dispatch and its bytes do
not depend on the thread count, but they do depend on how libggml-base was compiled: where the compiler may fuse
multiply-adds (an FMA-capable ``-march``, ``CFLAGS``, arm64), Q4_K, Q6_K and the other k-quants round
differently. Neither the library's digest (it embeds pip's random build path) nor llama.cpp's system info (it
describes ggml-cpu) tells these builds apart, so the fingerprint quantizes a fixed matrix with every block type
phibuild offers and digests the result: equal exactly when the compiled arithmetic is. It costs a fraction of a
second, so it is computed once per toolchain environment (one of its ``facts``).
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
from pathlib import Path

ROWS, WIDTH = 1024, 256  # fewer rows could not tell an AVX2 build from an AVX-512 one
# The block types that the file types phibuild offers are made of.
BLOCKS = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")


def quantizer() -> str:
    """The fingerprint of the installed llama.cpp quantizer (32 hex digits)."""
    return _fingerprint(_library())


def _library() -> Path:
    """libggml-base, found without importing llama_cpp (which loads every library)."""
    spec = importlib.util.find_spec("llama_cpp")
    for location in spec.submodule_search_locations or ():
        found = sorted(Path(location, "lib").glob("*ggml-base.*"))
        if found:
            return Path(os.path.realpath(found[0]))
    raise LookupError("llama-cpp-python's libggml-base")


def _canary() -> bytes:
    """Bell-shaped float32 weights from SHAKE-256, built exactly (integer sums times a power of two), with an
    outlier every 97 values as real weight rows have: the same floats on every machine."""
    import numpy as np

    raw = np.frombuffer(hashlib.shake_256(b"phibuild quantizer canary").digest(ROWS * WIDTH * 8), "<i2")
    values = raw.reshape(-1, 4).astype(np.int64).sum(axis=1).astype(np.float32) * np.float32(2.0**-20)
    values[::97] *= np.float32(8.0)
    return np.ascontiguousarray(values).tobytes()


def _fingerprint(library: Path) -> str:
    import gguf
    from llama_cpp import _ctypes_extensions  # llama-cpp-python's own loader: .so, .dylib or .dll

    lib = _ctypes_extensions.load_shared_library("ggml-base", library.parent)
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    source = ctypes.create_string_buffer(_canary())
    out = ctypes.create_string_buffer(len(source))  # every block type is smaller than float32
    digest = hashlib.sha256()
    for name in BLOCKS:
        size = lib.ggml_quantize_chunk(gguf.GGMLQuantizationType[name], source, out, 0, ROWS, WIDTH, None)
        digest.update(name.encode() + b"\0" + out.raw[:size])
    return digest.hexdigest()[:32]
