"""Signed remote entries, as Nix signs its binary caches: a remote writer signs each manifest it pushes with an
ed25519 secret key, and a project lists the public keys it trusts (``trusted_keys``). Where keys are listed, an
entry whose signature is missing, wrong or by another key is never pulled.

Keys are written as Nix writes them: ``NAME:BASE64``, the name saying whose key it is (``ci-1``), the base64 the 32
bytes of the public key, or of the secret key's seed in the secret key's file. A signature covers the manifest's
canonical JSON (sorted keys, no whitespace), so the bytes a remote stores it in do not matter, and it names the key
that made it. ``python -m phibuild.signing NAME FILE`` makes a key pair.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import reading
from . import validate as v
from .errors import ConfigError

CONTEXT = b"phibuild-manifest-1\0"  # so that a signature over a manifest can mean nothing else
ENVIRONMENT = "PHIBUILD_SIGNING_KEY"  # the secret key's file, on the machines that push


def _parse(text: Any, where: str, size: int = 32) -> tuple[str, bytes]:
    """``NAME:BASE64`` of ``size`` bytes."""
    name, _, encoded = v.text(text.strip() if isinstance(text, str) else text, where).partition(":")
    v.name(name, f"{where}: the key's name")
    try:
        raw = base64.b64decode(encoded, validate=True)
    except binascii.Error:
        raw = b""
    if len(raw) != size:
        kind = ("a public ed25519 key (32 bytes)" if size == 32
                else "a secret key as `python -m phibuild.signing` writes it")
        raise v.Invalid(f"{where} must be NAME:BASE64 of {kind}, like \"ci-1:...\"")
    return name, raw


@dataclass(frozen=True)
class PublicKey:
    name: str
    raw: bytes

    @classmethod
    def from_text(cls, text: Any, where: str) -> PublicKey:
        return cls(*_parse(text, where))

    def to_text(self) -> str:
        return f"{self.name}:{base64.b64encode(self.raw).decode()}"

    def verifies(self, data: bytes, signature: bytes) -> bool:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, data)
        except (InvalidSignature, ValueError):
            return False
        return True


@dataclass(frozen=True)
class SecretKey:
    """A signing key, written as Nix writes one: the 32-byte seed followed by the public key, so that a public key
    given where the secret one belongs is refused rather than signing with garbage."""

    name: str
    seed: bytes

    @classmethod
    def generate(cls, name: str) -> SecretKey:
        return cls(v.name(name, "the key's name"), os.urandom(32))

    @classmethod
    def from_file(cls, path: Path) -> SecretKey:
        """The key in ``path`` (read bounded), or a ConfigError naming the file and what is wrong."""
        where = f"{ENVIRONMENT} ({path})"
        try:
            name, raw = _parse(reading.read_text(path, "key"), where, 64)
        except (reading.Unreadable, v.Invalid) as exc:
            raise ConfigError(str(exc)) from None
        except OSError as exc:
            raise ConfigError(f"{ENVIRONMENT}: {path}: {exc.strerror or exc}") from None
        key = cls(name, raw[:32])
        if key.public().raw != raw[32:]:
            raise ConfigError(f"{where} is not a secret key: its two halves do not belong together")
        return key

    def to_text(self) -> str:
        return f"{self.name}:{base64.b64encode(self.seed + self.public().raw).decode()}"

    def public(self) -> PublicKey:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        key = Ed25519PrivateKey.from_private_bytes(self.seed).public_key()
        return PublicKey(self.name, key.public_bytes(Encoding.Raw, PublicFormat.Raw))

    def sign(self, manifest: dict[str, Any]) -> bytes:
        """The signature record of ``manifest`` (a manifest's ``to_dict``), as the remote stores it."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        signature = Ed25519PrivateKey.from_private_bytes(self.seed).sign(_message(manifest))
        return json.dumps({"key": self.name, "signature": base64.b64encode(signature).decode()}).encode()


def from_environment() -> SecretKey | None:
    """The secret key this machine signs what it pushes with, if ``PHIBUILD_SIGNING_KEY`` names one."""
    path = os.environ.get(ENVIRONMENT)
    return SecretKey.from_file(Path(path)) if path else None


def signer(trusted: list[PublicKey], manifest: dict[str, Any], record: bytes) -> str | None:
    """The name of the trusted key that signed ``manifest`` in ``record``, or None (no such key, a signature
    that does not verify, a record that is not one)."""
    try:
        data = reading.json_data(record, "a signature")
        name, encoded = v.name(data["key"], "key"), data["signature"]
        signature = base64.b64decode(v.text(encoded, "signature"), validate=True)
    except (reading.Unreadable, v.Invalid, KeyError, TypeError, binascii.Error):
        return None
    for key in trusted:
        if key.name == name and key.verifies(_message(manifest), signature):
            return name
    return None


def _message(manifest: dict[str, Any]) -> bytes:
    return CONTEXT + json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def main(arguments: list[str]) -> int:
    """``python -m phibuild.signing NAME FILE``: write a new secret key to FILE (mode 0600, never over an existing
    file) and print the public key to list in ``trusted_keys``."""
    if len(arguments) != 2:
        sys.stderr.write("usage: python -m phibuild.signing NAME FILE\n")
        return 2
    try:
        key = SecretKey.generate(arguments[0])
    except v.Invalid as exc:
        sys.stderr.write(f"{exc}\n")
        return 2
    try:
        fd = os.open(arguments[1], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        sys.stderr.write(f"{arguments[1]}: {exc.strerror}\n")
        return 1
    with os.fdopen(fd, "w") as handle:
        handle.write(key.to_text() + "\n")
    sys.stdout.write(f"{key.public().to_text()}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
