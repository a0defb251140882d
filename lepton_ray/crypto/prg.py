"""AES-256-CTR as a pseudorandom generator: ring elements, uniform floats, public integers.

A 32-byte seed is used as an AES-256 key and the keystream ``AES_k(0) || AES_k(1) || ...``
(128-bit big-endian counter starting at zero, NIST SP 800-38A §6.5) is read as little-endian
``uint32``/``uint64`` ring elements. Under the PRP assumption on AES the stream is
indistinguishable from uniform, so a mask expanded from a secret seed is a one-time pad on
Z_{2^b} (Bonawitz et al. 2017, §3: "PRG(s)"). Each seed is used for exactly one stream (seeds
are HKDF outputs bound to job, round and pair, or fresh OS randomness), so the fixed zero
initial counter never repeats a (key, counter) pair.

Speed matters: masks are expanded by ``update_into`` straight into a preallocated buffer in
chunks of up to 4 MiB and added into the accumulator in place, never via Python ints. Never
use ``random`` or ``np.random`` for anything secret; :class:`PublicRandom` is for *public*
choices (the neighbour graph) that every party must reproduce bit for bit, which numpy's
generators do not promise across versions.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from lepton_ray.crypto.kdf import KeyPurpose, derive_key
from lepton_ray.errors import ConfigError, ProtocolError

SEED_BYTES = 32
BLOCK_BYTES = 16
ZERO_COUNTER = bytes(BLOCK_BYTES)
DEFAULT_CHUNK_BYTES = 1 << 22
_CTR_FROM_ZERO = modes.CTR(ZERO_COUNTER)  # immutable; shared by every stream


def _public_encryptor(key: bytes):
    return Cipher(algorithms.AES(key), _CTR_FROM_ZERO).encryptor()


def _direct_encryptor():
    """The context constructor that ``Cipher(...).encryptor()`` ends in, called without the
    wrapper's per-call checks (9 us instead of 21 us a stream; a host expands tens of
    thousands of masks a round). Used only if present and if it reproduces the public API's
    keystream on a known key; otherwise the public API is used."""
    try:
        from cryptography.hazmat.bindings._rust import openssl as rust_openssl

        create = rust_openssl.ciphers.create_encryption_ctx
        key, zeros = bytes(range(32)), bytes(64)
        if create(algorithms.AES(key), _CTR_FROM_ZERO).update(zeros) != \
                _public_encryptor(key).update(zeros):
            return None
        return lambda key: create(algorithms.AES(key), _CTR_FROM_ZERO)
    except Exception:  # noqa: BLE001 - any change in the private API: use the public one
        return None


_make_encryptor = _direct_encryptor() or _public_encryptor


def _encryptor(key: bytes):
    if not isinstance(key, bytes) or len(key) != SEED_BYTES:
        raise ProtocolError(f"PRG seed must be {SEED_BYTES} bytes")
    return _make_encryptor(key)


def keystream(key: bytes, nbytes: int) -> bytes:
    """The first ``nbytes`` of the AES-256-CTR keystream of ``key`` (small outputs, tests)."""
    return _encryptor(key).update(bytes(nbytes))


class KeystreamReader:
    """One AES-256-CTR keystream read in consecutive pieces into a reused buffer, so a long
    stream (a host's rounding noise for every party) never sits in memory whole."""

    def __init__(self, key: bytes, max_piece_bytes: int):
        self._enc = _encryptor(key)
        self._buf = np.empty(max(1, max_piece_bytes) + BLOCK_BYTES, dtype=np.uint8)

    def read(self, nbytes: int) -> np.ndarray:
        """The next ``nbytes`` of the stream as uint8, valid until the next read."""
        if nbytes > self._buf.size - BLOCK_BYTES:
            raise ValueError(f"read of {nbytes} bytes exceeds the piece size")
        zeros = _zero_chunk()
        for start in range(0, nbytes, DEFAULT_CHUNK_BYTES):
            stop = min(nbytes, start + DEFAULT_CHUNK_BYTES)
            self._enc.update_into(zeros[: stop - start], self._buf[start:])
        return self._buf[:nbytes]


_ZEROS: np.ndarray | None = None


def _zero_chunk() -> np.ndarray:
    """One shared, never-written chunk of zero bytes: the plaintext CTR mode encrypts."""
    global _ZEROS
    if _ZEROS is None:
        _ZEROS = np.zeros(DEFAULT_CHUNK_BYTES, dtype=np.uint8)
        _ZEROS.flags.writeable = False
    return _ZEROS


def ring_dtype(modulus_bits: int) -> np.dtype:
    """Little-endian unsigned dtype of Z_{2^b}, b in {32, 64}."""
    if modulus_bits == 32:
        return np.dtype("<u4")
    if modulus_bits == 64:
        return np.dtype("<u8")
    raise ConfigError([f"modulus_bits: must be 32 or 64, got {modulus_bits!r}"])


class MaskExpander:
    """Expands seeds into ring vectors of one length, reusing its buffers.

    ``add(acc, seed)`` / ``subtract(acc, seed)`` do ``acc (+/-)= PRG(seed)`` in place with
    wraparound in Z_{2^b}. One expander serves every party of a host (not thread-safe).
    """

    def __init__(self, dim: int, dtype: np.dtype | type, *,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        self.dim = int(dim)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        if self.dtype.kind != "u":
            raise ConfigError([f"ring dtype: must be an unsigned integer type, got {self.dtype}"])
        item = self.dtype.itemsize
        self._per_chunk = max(1, min(self.dim, chunk_bytes // item))
        nbytes = self._per_chunk * item
        self._zeros = np.zeros(nbytes, dtype=np.uint8)
        # update_into wants room for one extra block beyond the input length.
        self._scratch = np.empty(nbytes + BLOCK_BYTES, dtype=np.uint8)

    def _apply(self, acc: np.ndarray, key: bytes, op) -> None:
        if acc.shape != (self.dim,) or acc.dtype != self.dtype or not acc.flags.c_contiguous:
            raise ProtocolError(
                f"accumulator must be a contiguous {self.dtype} vector of length {self.dim}, "
                f"got {acc.dtype} with shape {acc.shape}")
        enc = _encryptor(key)
        item = self.dtype.itemsize
        step = self._per_chunk
        for start in range(0, self.dim, step):
            stop = min(self.dim, start + step)
            nbytes = (stop - start) * item
            enc.update_into(self._zeros[:nbytes], self._scratch)
            part = acc[start:stop]
            op(part, self._scratch[:nbytes].view(self.dtype), out=part)

    def add(self, acc: np.ndarray, key: bytes) -> None:
        self._apply(acc, key, np.add)

    def subtract(self, acc: np.ndarray, key: bytes) -> None:
        self._apply(acc, key, np.subtract)

    def expand(self, key: bytes) -> np.ndarray:
        out = np.zeros(self.dim, dtype=self.dtype)
        self.add(out, key)
        return out


def uniform_floats(key: bytes, n: int) -> np.ndarray:
    """``n`` floats uniform on [0, 1) with 53 random bits each, from AES-256-CTR(key)."""
    words = np.frombuffer(keystream(key, 8 * n), dtype="<u8")
    return (words >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


class PublicRandom:
    """Reproducible *public* randomness: integers from AES-256-CTR of HKDF(seed).

    For choices every party and the server must make identically (the neighbour graph);
    never for secrets. Uniform integers by rejection sampling (no modulo bias).
    """

    _BATCH = 4096

    def __init__(self, seed: bytes, *context: str | int | bytes):
        self._enc = _encryptor(derive_key(seed, KeyPurpose.PUBLIC_RANDOMNESS, *context))
        self._words: list[int] = []

    def next_u64(self) -> int:
        if not self._words:
            block = self._enc.update(bytes(8 * self._BATCH))
            self._words = np.frombuffer(block, dtype="<u8").tolist()
            self._words.reverse()
        return self._words.pop()

    def below(self, bound: int) -> int:
        """Uniform integer in [0, bound)."""
        if bound <= 0:
            raise ProtocolError(f"bound must be positive, got {bound}")
        limit = (1 << 64) - ((1 << 64) % bound)
        while True:
            word = self.next_u64()
            if word < limit:
                return word % bound

    def shuffle(self, items: list) -> None:
        """Fisher-Yates shuffle in place."""
        for i in range(len(items) - 1, 0, -1):
            j = self.below(i + 1)
            items[i], items[j] = items[j], items[i]
