"""Unambiguous byte encodings for transcripts: what gets signed, MACed or fed to HKDF.

Every field is written as ``tag || length (4 bytes, big endian) || bytes`` so two different
field lists can never encode to the same string (no ``"ab" + "c" == "a" + "bc"`` ambiguity).
That property is what makes domain separation and associated data binding sound: a signature
or a GCM tag over one encoding cannot be reused for another tuple of values.
"""

from __future__ import annotations

from lepton_ray.errors import ProtocolError

Field = bytes | str | int

_MAX_INT = 2**64


def encode_fields(*fields: Field) -> bytes:
    """Encode ``fields`` (bytes, str or non-negative int < 2**64) injectively.

    Raises :class:`ProtocolError` for a field of another type or an out-of-range integer:
    these values come from peers' messages, so a bad one is a rejected message, not a bug.
    """
    parts = []
    for field in fields:
        kind = type(field)
        if kind is bytes:
            parts.append(b"b" + len(field).to_bytes(4, "big") + field)
        elif kind is int:
            if not 0 <= field < _MAX_INT:
                raise ProtocolError(f"integer field {field} is outside [0, 2**64)")
            parts.append(b"i\x00\x00\x00\x08" + field.to_bytes(8, "big"))
        elif kind is str:
            data = field.encode("utf-8")
            parts.append(b"s" + len(data).to_bytes(4, "big") + data)
        elif isinstance(field, (bytes, bytearray, memoryview)):
            data = bytes(field)
            parts.append(b"b" + len(data).to_bytes(4, "big") + data)
        else:
            raise ProtocolError(f"cannot encode field of type {kind.__name__}")
    return b"".join(parts)
