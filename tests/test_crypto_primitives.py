"""Crypto layer: encoding, HKDF separation, envelopes, identities, key agreement, PRG."""

from __future__ import annotations

import os

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from lepton_ray.crypto import (
    EnvelopeHeader,
    IdentityKey,
    KeyPurpose,
    MaskExpander,
    PublicRandom,
    Roster,
    SignatureVerifier,
    X25519KeyPair,
    channel_cipher,
    derive_key,
    encode_fields,
    keystream,
    open_envelope,
    pair_key,
    public_key_of,
    ring_dtype,
    seal,
    uniform_floats,
)
from lepton_ray.crypto.kdf import expand_key
from lepton_ray.errors import ConfigError, ProtocolError
from lepton_ray.secagg.stages import Stage

fields = st.lists(st.one_of(st.binary(max_size=8), st.text(max_size=4),
                            st.integers(0, 2**64 - 1)), max_size=4)


@settings(max_examples=200, deadline=None)
@given(fields, fields)
def test_encoding_is_injective(a, b):
    if [(type(x), x) for x in a] != [(type(x), x) for x in b]:
        assert encode_fields(*a) != encode_fields(*b)


def test_encoding_rejects_bad_fields():
    for bad in (-1, 2**64, True, 1.5, None):
        with pytest.raises(ProtocolError):
            encode_fields(bad)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))
def test_envelope_associated_data_is_the_field_encoding(sender, receiver):
    header = EnvelopeHeader("job", 4, Stage.SHARE_KEYS, sender, receiver)
    want = encode_fields(b"lepton-ray/v1/envelope", "job", 4, "Stage.SHARE_KEYS", sender,
                         receiver)
    assert header.associated_data() == want


def test_envelope_associated_data_rejects_bad_ids():
    for bad in (-1, 2**64, True, 1.5):
        with pytest.raises(ProtocolError):
            EnvelopeHeader("job", 4, Stage.SHARE_KEYS, bad, 1).associated_data()


def test_hkdf_domain_separation():
    secret = os.urandom(32)
    keys = {derive_key(secret, purpose, "job", 1) for purpose in KeyPurpose}
    assert len(keys) == len(KeyPurpose)
    assert derive_key(secret, KeyPurpose.CHANNEL, "job", 1) != derive_key(
        secret, KeyPurpose.CHANNEL, "job", 2)
    assert derive_key(secret, KeyPurpose.CHANNEL, "job", 1) == derive_key(
        secret, KeyPurpose.CHANNEL, "job", 1)


def _header(**changes):
    base = {"job_id": "job", "round": 3, "stage": Stage.SHARE_KEYS, "sender": 1, "receiver": 2}
    base.update(changes)
    return EnvelopeHeader(**base)


def test_envelope_round_trip_and_binding():
    cipher = channel_cipher(os.urandom(32))
    blob = seal(cipher, _header(), b"secret share")
    assert open_envelope(cipher, _header(), blob) == b"secret share"
    for changed in ({"job_id": "other"}, {"round": 4}, {"stage": Stage.UNMASK},
                    {"sender": 2, "receiver": 1}, {"receiver": 5}):
        with pytest.raises(ProtocolError, match="tag"):
            open_envelope(cipher, _header(**changed), blob)
    tampered = bytearray(blob)
    tampered[20] ^= 1
    with pytest.raises(ProtocolError, match="tampered"):
        open_envelope(cipher, _header(), bytes(tampered))
    with pytest.raises(ProtocolError):
        open_envelope(channel_cipher(os.urandom(32)), _header(), blob)
    with pytest.raises(ProtocolError, match="too short"):
        open_envelope(cipher, _header(), b"short")


def test_identity_roster_and_verifier():
    ids = [IdentityKey.generate() for _ in range(3)]
    roster = Roster.of(ids)
    assert len(roster) == 3 and 2 in roster and 3 not in roster and True not in roster
    with pytest.raises(ProtocolError, match="not in the roster"):
        roster.public_key(7)
    with pytest.raises(ConfigError):
        Roster((ids[0].public_bytes, ids[0].public_bytes))
    with pytest.raises(ConfigError):
        Roster((b"short",))
    verifier = SignatureVerifier()
    sig = ids[0].sign(b"msg")
    assert verifier.verify(ids[0].public_bytes, b"msg", sig)
    assert verifier.verify(ids[0].public_bytes, b"msg", sig)  # memoised path
    assert not verifier.verify(ids[1].public_bytes, b"msg", sig)
    assert not verifier.verify(ids[0].public_bytes, b"msg2", sig)
    assert not verifier.verify(ids[0].public_bytes, b"msg", b"")
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(ids[0])


def test_key_agreement_is_symmetric_and_separated():
    a, b = X25519KeyPair.generate(), X25519KeyPair.generate()
    ctx = encode_fields("j")
    k_ab = pair_key(a.exchange(b.public_bytes), KeyPurpose.CHANNEL, own=1, own_public=a.public_bytes,
                    peer=2, peer_public=b.public_bytes, encoded_context=ctx)
    k_ba = pair_key(b.exchange(a.public_bytes), KeyPurpose.CHANNEL, own=2, own_public=b.public_bytes,
                    peer=1, peer_public=a.public_bytes, encoded_context=ctx)
    assert k_ab == k_ba
    assert k_ab != pair_key(a.exchange(b.public_bytes), KeyPurpose.PAIRWISE_MASK, own=1,
                            own_public=a.public_bytes, peer=2, peer_public=b.public_bytes,
                            encoded_context=ctx)
    assert public_key_of(a.private_bytes()) == a.public_bytes
    with pytest.raises(ProtocolError, match="small-order"):
        a.exchange(bytes(32))  # the identity point: all-zero shared secret
    with pytest.raises(ProtocolError):
        a.exchange(b"short")


def test_expand_key_is_rfc5869_hkdf_expand():
    """Oracle: the cryptography package's HKDFExpand (RFC 5869 §2.3)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

    prk = bytes(range(32))
    info = encode_fields("job", 3, b"n" * 16)
    want = HKDFExpand(algorithm=hashes.SHA256(), length=32,
                      info=KeyPurpose.PAIRWISE_MASK.value + info).derive(prk)
    assert expand_key(prk, KeyPurpose.PAIRWISE_MASK, info) == want
    assert expand_key(prk, KeyPurpose.CHANNEL, info) != want
    with pytest.raises(ProtocolError):
        expand_key(b"short", KeyPurpose.CHANNEL)


def test_prg_is_aes_ctr_against_ecb_oracle():
    """Block j of the keystream must equal AES-256-ECB_k(j as a 128-bit big-endian int)."""
    key = os.urandom(32)
    stream = keystream(key, 16 * 70)
    ecb = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    for block in (0, 1, 5, 69):
        expected = ecb.update(block.to_bytes(16, "big"))
        assert stream[16 * block:16 * (block + 1)] == expected
    for bits in (32, 64):
        dtype = ring_dtype(bits)
        dim = 16 * 70 // dtype.itemsize
        vec = MaskExpander(dim, dtype).expand(key)
        assert vec.tobytes() == stream
        # chunked expansion (odd chunk size, not a block multiple) gives the same stream
        assert MaskExpander(dim, dtype, chunk_bytes=40).expand(key).tobytes() == stream


def test_mask_expander_add_subtract_wrap():
    key = os.urandom(32)
    exp = MaskExpander(1000, np.uint32)
    acc = np.arange(1000, dtype=np.uint32)
    exp.add(acc, key)
    exp.subtract(acc, key)
    assert np.array_equal(acc, np.arange(1000, dtype=np.uint32))
    with pytest.raises(ProtocolError):
        exp.add(np.zeros(999, np.uint32), key)
    with pytest.raises(ConfigError):
        MaskExpander(4, np.int32)
    with pytest.raises(ConfigError):
        ring_dtype(16)


def test_uniform_floats_and_public_random():
    u = uniform_floats(os.urandom(32), 10000)
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.02
    a, b = PublicRandom(b"s" * 32, "ctx", 1), PublicRandom(b"s" * 32, "ctx", 1)
    draws = [a.below(7) for _ in range(500)]
    assert draws == [b.below(7) for _ in range(500)]
    assert set(draws) == set(range(7))
    assert [PublicRandom(b"s" * 32, "ctx", 2).below(1000) for _ in range(5)] != [
        PublicRandom(b"s" * 32, "ctx", 1).below(1000) for _ in range(5)]
    items = list(range(20))
    PublicRandom(b"t" * 32).shuffle(items)
    assert sorted(items) == list(range(20))


@pytest.mark.parametrize("nbytes", [1, 15, 16, 17, 4096, (1 << 22) - 1, 1 << 22, (1 << 22) + 16,
                                    (1 << 23) + 17])
def test_keystream_reader_reads_the_aes_ctr_stream_across_chunk_boundaries(nbytes):
    """Oracle: AES-256-CTR from zero straight from the cryptography package."""
    from lepton_ray.crypto.prg import KeystreamReader

    key = bytes(range(32))
    want = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(nbytes))
    assert KeystreamReader(key, nbytes).read(nbytes).tobytes() == want


def test_mask_streams_match_the_public_aes_ctr_api_for_random_keys():
    """Masks come from the context constructor behind ``Cipher.encryptor()``, called
    directly; the public API is the oracle."""
    from lepton_ray.crypto import prg

    expander = MaskExpander(1000, np.uint32)
    for _ in range(20):
        key = os.urandom(32)
        want = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(4000))
        assert expander.expand(key).tobytes() == want
    assert prg._make_encryptor is not prg._public_encryptor  # the fast path is in use here


def test_a_changed_private_cipher_api_falls_back_to_the_public_one(monkeypatch):
    from cryptography.hazmat.bindings._rust import openssl as rust_openssl

    from lepton_ray.crypto import prg

    class Wrong:
        @staticmethod
        def create_encryption_ctx(algorithm, mode):
            return Cipher(algorithm, modes.CTR(b"\x01" * 16)).encryptor()  # another stream

    monkeypatch.setattr(rust_openssl, "ciphers", Wrong)
    assert prg._direct_encryptor() is None
    monkeypatch.delattr(Wrong, "create_encryption_ctx")
    assert prg._direct_encryptor() is None


def test_keystream_reader_pieces_continue_one_stream():
    from lepton_ray.crypto.prg import KeystreamReader

    key = os.urandom(32)
    want = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(10_000))
    reader = KeystreamReader(key, 4096)
    got = b"".join(reader.read(n).tobytes() for n in (1, 15, 4096, 17, 3000, 2871))
    assert got == want
    with pytest.raises(ValueError, match="piece size"):
        reader.read(4097)


def test_batch_envelopes_are_single_envelopes_side_by_side():
    from lepton_ray.crypto.envelope import OVERHEAD_BYTES, open_batch, seal_batch

    receivers = [3, 9, 2**40]
    ciphers = [channel_cipher(os.urandom(32)) for _ in receivers]
    plaintexts = [os.urandom(72) for _ in receivers]
    blob = seal_batch("job", 5, Stage.SHARE_KEYS, 1, receivers, ciphers, plaintexts)
    size = OVERHEAD_BYTES + 72
    assert len(blob) == size * 3
    for i, (receiver, cipher) in enumerate(zip(receivers, ciphers)):  # oracle: one by one
        header = EnvelopeHeader("job", 5, Stage.SHARE_KEYS, 1, receiver)
        assert open_envelope(cipher, header, blob[i * size:(i + 1) * size]) == plaintexts[i]
    # the receiver's view: one sender per envelope
    ones = [seal_batch("job", 5, Stage.SHARE_KEYS, s, [7], [c], [p])
            for s, c, p in zip(receivers, ciphers, plaintexts)]
    assert open_batch("job", 5, Stage.SHARE_KEYS, receivers, 7, ciphers, b"".join(ones),
                      size) == plaintexts
    tampered = bytearray(b"".join(ones))
    tampered[size + 20] ^= 1
    got = open_batch("job", 5, Stage.SHARE_KEYS, receivers, 7, [ciphers[0], ciphers[1], None],
                     bytes(tampered), size)
    assert got == [plaintexts[0], None, None]
    assert open_batch("job", 6, Stage.SHARE_KEYS, receivers, 7, ciphers, b"".join(ones),
                      size) == [None] * 3  # bound to the round
    with pytest.raises(ProtocolError, match="expected 3 envelopes"):
        open_batch("job", 5, Stage.SHARE_KEYS, receivers, 7, ciphers, bytes(tampered[:-1]), size)
