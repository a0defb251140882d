"""Encryption at rest: AES-256-GCM files with a versioned header.

A checkpoint or a model file holds the global model and, with some strategies, optimiser
state from which a curious reader of the disk could learn about the training data. This
module seals such files under a 256-bit key that never touches the output directory.

File format (version 1)::

    magic  b"LRAR" (4 bytes) | version (1 byte) | nonce (12 bytes) | ciphertext | tag (16 bytes)

AES-256-GCM (McGrew & Viega 2004; NIST SP 800-38D) authenticates the ciphertext *and* the
associated data, which here is ``header || associated``: the header (magic, version, nonce)
cannot be altered without failing the tag, and a caller can bind a file to its purpose
(``associated=b"checkpoint"``) so that one sealed file cannot be swapped for another under the
same key. The header has a fixed length, so the concatenation is unambiguous.

Nonces are 96 random bits from the OS for every file written. With random nonces one key may
seal at most 2**32 files (SP 800-38D §8.3); a job writes a handful per round.

A wrong key, a flipped bit, a truncated or extended file all fail the same tag check, and GCM
cannot tell them apart: the error says "wrong key or corrupted file", never which.

Unlike the rest of :mod:`lepton_ray.crypto`, this module also touches the file system: it
reads key files and writes sealed files atomically (temporary file, fsync, rename). The
byte-level functions :func:`encrypt_bytes` and :func:`decrypt_bytes` stay pure.
Key material never appears in an error message.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Callable
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from lepton_ray.errors import DataError

MAGIC = b"LRAR"
VERSION = 1
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
HEADER_BYTES = len(MAGIC) + 1 + NONCE_BYTES
OVERHEAD_BYTES = HEADER_BYTES + TAG_BYTES
SUFFIX = ".enc"

_HEX_KEY = re.compile(r"[0-9a-fA-F]{64}")
_B64_KEY = re.compile(r"[A-Za-z0-9+/_-]{43}=?")
_KEY_FORMS = f"{KEY_BYTES} raw bytes, {2 * KEY_BYTES} hex digits or base64 of {KEY_BYTES} bytes"


def generate_key() -> bytes:
    """A fresh 256-bit key from the OS (store it as ``key.hex()`` in a file or a variable)."""
    return os.urandom(KEY_BYTES)


def encrypt_bytes(plaintext: bytes, key: bytes, *, associated: bytes = b"",
                  entropy: Callable[[int], bytes] = os.urandom) -> bytes:
    """Seal ``plaintext``: ``header || AES-256-GCM(key, nonce, plaintext, header || associated)``."""
    cipher = _cipher(key)
    nonce = entropy(NONCE_BYTES)
    if len(nonce) != NONCE_BYTES:
        raise ValueError(f"entropy returned {len(nonce)} bytes, expected {NONCE_BYTES}")
    header = MAGIC + bytes([VERSION]) + nonce
    return header + cipher.encrypt(nonce, bytes(plaintext), header + associated)


def decrypt_bytes(sealed: bytes, key: bytes, *, associated: bytes = b"",
                  source: str = "encrypted data") -> bytes:
    """Open what :func:`encrypt_bytes` sealed; :class:`DataError` naming ``source`` if the
    data is not ours, from a newer format, truncated, altered, or sealed under another key."""
    cipher = _cipher(key)
    sealed = bytes(sealed)
    if not sealed.startswith(MAGIC):
        if len(sealed) < len(MAGIC) and MAGIC.startswith(sealed):
            raise DataError(f"{source}: truncated ({len(sealed)} bytes): wrong key or corrupted file")
        raise DataError(f"{source}: not a Lepton-Ray encrypted file (no {MAGIC.decode()} header)")
    if len(sealed) < len(MAGIC) + 1:
        raise DataError(f"{source}: truncated ({len(sealed)} bytes): wrong key or corrupted file")
    version = sealed[len(MAGIC)]
    if version != VERSION:
        raise DataError(
            f"{source}: encrypted with format version {version}; this Lepton-Ray reads "
            f"version {VERSION} (wrong key or corrupted file if you did not expect a newer one)")
    if len(sealed) < OVERHEAD_BYTES:
        raise DataError(
            f"{source}: truncated ({len(sealed)} bytes, a sealed file has at least "
            f"{OVERHEAD_BYTES}): wrong key or corrupted file")
    header, body = sealed[:HEADER_BYTES], sealed[HEADER_BYTES:]
    nonce = header[len(MAGIC) + 1:]
    try:
        return cipher.decrypt(nonce, body, header + associated)
    except InvalidTag:
        raise DataError(
            f"{source}: authentication failed: wrong key or corrupted file "
            "(AES-GCM tag mismatch; nothing was decrypted)") from None


def is_encrypted(data: bytes) -> bool:
    """Whether ``data`` starts like a sealed file (a hint for readers; proves nothing)."""
    return bytes(data[:len(MAGIC)]) == MAGIC


# --------------------------------------------------------------------------- files


def write_encrypted(path: str | os.PathLike, plaintext: bytes, key: bytes, *,
                    associated: bytes = b"") -> Path:
    """Seal ``plaintext`` into ``path`` atomically: a temporary file in the same directory,
    fsynced, renamed over ``path``, directory fsynced. A crash leaves the old file or the new
    one, never a mix. The file is created with mode 0600."""
    from lepton_ray.outputs import atomic_write_bytes

    path = Path(path)
    atomic_write_bytes(path, encrypt_bytes(plaintext, key, associated=associated))
    return path


def read_encrypted(path: str | os.PathLike, key: bytes, *, associated: bytes = b"") -> bytes:
    path = Path(path)
    sealed = _read(path, "encrypted file")
    return decrypt_bytes(sealed, key, associated=associated, source=str(path))


def _read(path: Path, what: str) -> bytes:
    """The bytes of ``path``; :class:`DataError` naming ``what`` and the path otherwise."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise DataError(f"{what} {path}: is a directory") from None
    except OSError as exc:
        raise DataError(f"cannot read {what} {path}: {exc.strerror}") from None


def decrypted_name(path: str | os.PathLike) -> Path:
    """``model.pt.enc`` -> ``model.pt``; :class:`DataError` if there is no ``.enc`` suffix."""
    path = Path(path)
    if path.suffix != SUFFIX or path.name == SUFFIX:
        raise DataError(f"{path}: has no {SUFFIX} suffix to strip; name the output explicitly")
    return path.with_suffix("")


# --------------------------------------------------------------------------- keys


def load_key(*, key_file: str | os.PathLike | None = None, key_env: str | None = None) -> bytes:
    """The 32-byte key from exactly one of a file or an environment variable.

    A file holds 32 raw bytes, or text: 64 hex digits or base64 of 32 bytes (surrounding
    whitespace ignored). A variable holds the text forms only. Every problem raises
    :class:`DataError` naming the file or the variable, never the key.
    """
    if (key_file is None) == (key_env is None):
        raise DataError("give exactly one key source: a key file or a key environment variable")
    if key_env is not None:
        value = os.environ.get(key_env)
        if value is None:
            raise DataError(f"key variable {key_env} is not set")
        key = _parse_text_key(value.strip())
        if key is None:
            raise DataError(
                f"key variable {key_env}: expected {2 * KEY_BYTES} hex digits or base64 of "
                f"{KEY_BYTES} bytes, got {_describe(value.strip().encode())}")
        return key
    path = Path(key_file)
    raw = _read(path, "key file")
    try:
        key = _parse_text_key(raw.decode("ascii").strip())
    except UnicodeDecodeError:
        key = None
    if key is None and len(raw) == KEY_BYTES:
        key = raw
    if key is None:
        raise DataError(f"key file {path}: expected {_KEY_FORMS}, got {_describe(raw)}")
    return key


def _parse_text_key(text: str) -> bytes | None:
    if _HEX_KEY.fullmatch(text):
        return bytes.fromhex(text)
    if _B64_KEY.fullmatch(text):  # standard or URL-safe alphabet, padding optional
        body = text.rstrip("=").replace("-", "+").replace("_", "/")
        try:
            key = base64.b64decode(body + "=", validate=True)
        except binascii.Error:
            return None
        return key if len(key) == KEY_BYTES else None
    return None


def _describe(raw: bytes) -> str:
    """How long the bad key material is, and nothing else about it."""
    return f"{len(raw)} bytes" if raw else "an empty value"


def _cipher(key: bytes) -> AESGCM:
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
        size = len(key) if isinstance(key, (bytes, bytearray)) else type(key).__name__
        raise DataError(f"AES-256-GCM needs a {KEY_BYTES}-byte key, got {size}")
    return AESGCM(bytes(key))
