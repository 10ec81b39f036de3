"""Record validators: run on every store and on every value a lookup returns.

- :class:`SignatureValidator`: a key or subkey containing ``[owner:<base58 Ed25519 public key>]``
  can only be written with that owner's signature over msgpack([key, subkey, value, expiration]),
  appended to the stored value as ``[signature:<64 bytes>]``. Others cannot overwrite it (no
  signature), change it (the signature breaks) or extend an old one (the expiration is signed, and a
  replayed older record loses to the newer one). Storage protects signed *subkeys* further: a key
  holding one accepts only subkeys, so no unsigned plain value can replace or hide the dictionary
  (see :mod:`dht.storage`, :func:`has_owner_marker`).
- :class:`SchemaValidator`: values under given keys must match a pydantic model's field types,
  strictly (no coercion).

Validators see serialized records (:class:`DHTRecord`, msgpack bytes) and are chained by
:class:`CompositeValidator`: signing in increasing ``priority``, validating and stripping in
decreasing priority (so the signature is checked, then removed, before schemas see the value).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Iterable

import msgpack

from .identity import Identity, b58decode, b58encode, verify_signature

__all__ = ["DHTRecord", "ValidationError", "RecordValidator", "CompositeValidator", "SignatureValidator",
           "SchemaValidator", "has_owner_marker"]


class ValidationError(ValueError):
    """A record was rejected by a validator; the message says which rule and why."""


@dataclass(frozen=True)
class DHTRecord:
    key: bytes  # msgpack of the key
    subkey: bytes | None  # msgpack of the subkey, None for a regular value
    value: bytes  # msgpack of the value (plus whatever validators append)
    expiration_time: float


class RecordValidator:
    """Base class: accepts everything and changes nothing."""

    priority: int = 0

    def validate(self, record: DHTRecord) -> None:
        """Raise ValidationError if the record must be rejected."""

    def sign_value(self, record: DHTRecord) -> bytes:
        """The value to store (e.g. with a signature appended)."""
        return record.value

    def strip_value(self, record: DHTRecord) -> bytes:
        """The value handed back to the application (e.g. without the signature)."""
        return record.value


class CompositeValidator(RecordValidator):
    def __init__(self, validators: Iterable[RecordValidator] = ()):
        self.validators: list[RecordValidator] = []
        self.extend(validators)

    def extend(self, validators: Iterable[RecordValidator]) -> None:
        self.validators.extend(validators)
        self.validators.sort(key=lambda v: v.priority)

    def sign_value(self, record: DHTRecord) -> bytes:
        for validator in self.validators:
            record = replace(record, value=validator.sign_value(record))
        return record.value

    def validate(self, record: DHTRecord) -> None:
        self.validate_and_strip(record)

    def validate_and_strip(self, record: DHTRecord) -> bytes:
        """Validate with every validator (highest priority first) and return the stripped value."""
        for validator in reversed(self.validators):
            validator.validate(record)
            record = replace(record, value=validator.strip_value(record))
        return record.value

    def strip_value(self, record: DHTRecord) -> bytes:
        for validator in reversed(self.validators):
            record = replace(record, value=validator.strip_value(record))
        return record.value


_OWNER = re.compile(rb"\[owner:([1-9A-HJ-NP-Za-km-z]{40,50})\]")
_SIG_PREFIX = b"[signature:"
_SIG_SUFFIX_LEN = len(_SIG_PREFIX) + 64 + 1


def has_owner_marker(data: bytes | None) -> bool:
    """Whether ``data`` (a serialized key or subkey) carries a well-formed ``[owner:...]`` marker, i.e.
    whether records under it must be signed (storage protects such subkeys from being replaced)."""
    if data is None or b"[owner:" not in data:
        return False
    for match in _OWNER.finditer(data):
        try:
            b58decode(match.group(1).decode())
            return True
        except ValueError:
            continue
    return False


class SignatureValidator(RecordValidator):
    """Ed25519-signed records; ``ownership_marker`` is the marker for this peer's own key."""

    priority = 10

    def __init__(self, identity: Identity):
        self.identity = identity
        self.ownership_marker: str = f"[owner:{b58encode(identity.public_key)}]"

    @staticmethod
    def owners(record: DHTRecord) -> set[bytes]:
        found = set()
        for part in (record.key, record.subkey or b""):
            for match in _OWNER.finditer(part):
                try:
                    key = b58decode(match.group(1).decode())
                except ValueError:
                    continue
                found.add(key)
        return found

    @staticmethod
    def _signed_payload(record: DHTRecord, value: bytes) -> bytes:
        return msgpack.packb([record.key, record.subkey, value, record.expiration_time], use_bin_type=True)

    def sign_value(self, record: DHTRecord) -> bytes:
        if self.owners(record) != {self.identity.public_key}:
            return record.value  # not ours to sign (validation will reject it if it is protected)
        signature = self.identity.sign(self._signed_payload(record, record.value))
        return record.value + _SIG_PREFIX + signature + b"]"

    def validate(self, record: DHTRecord) -> None:
        owners = self.owners(record)
        if not owners:
            return
        if len(owners) > 1:
            raise ValidationError("record names more than one owner")
        (owner,) = owners
        value = record.value
        if (len(value) < _SIG_SUFFIX_LEN or not value.endswith(b"]")
                or value[-_SIG_SUFFIX_LEN:-65] != _SIG_PREFIX):
            raise ValidationError("record with an owner marker is not signed")
        signature, body = value[-65:-1], value[:-_SIG_SUFFIX_LEN]
        if len(owner) != 32 or not verify_signature(owner, signature, self._signed_payload(record, body)):
            raise ValidationError("signature does not match the owner's key (tampered or forged record)")

    def strip_value(self, record: DHTRecord) -> bytes:
        if self.owners(record) and record.value.endswith(b"]") and len(record.value) >= _SIG_SUFFIX_LEN:
            return record.value[:-_SIG_SUFFIX_LEN]
        return record.value


class SchemaValidator(RecordValidator):
    """Values must match a pydantic model: field ``name`` governs key ``name`` (or ``prefix_name``).

    For a regular value the field's type checks the value; for a subkey the field's type checks
    ``{subkey: value}`` (declare it as a ``dict[...]``). Checking is strict: no type coercion.
    Keys that are not fields pass when ``allow_extra_keys`` (default) is set.
    """

    priority = 5

    def __init__(self, schema: Any, prefix: str | None = None, allow_extra_keys: bool = True):
        import pydantic

        self._pydantic = pydantic
        self.schema, self.prefix, self.allow_extra_keys = schema, prefix, allow_extra_keys
        self._adapters = {name: pydantic.TypeAdapter(f.annotation, config=None)
                          for name, f in schema.model_fields.items()}

    def _field(self, key: Any) -> str | None:
        if not isinstance(key, str):
            return None
        if self.prefix is not None:
            if not key.startswith(self.prefix + "_"):
                return None
            key = key[len(self.prefix) + 1:]
        return key if key in self._adapters else None

    def validate(self, record: DHTRecord) -> None:
        try:
            key = msgpack.unpackb(record.key, raw=False)
        except Exception:
            raise ValidationError("key is not valid msgpack") from None
        name = self._field(key)
        if name is None:
            if self.allow_extra_keys:
                return
            raise ValidationError(f"key {key!r} is not allowed by schema {self.schema.__name__}")
        try:
            value = msgpack.unpackb(record.value, raw=False, strict_map_key=False)
            if record.subkey is not None:
                value = {msgpack.unpackb(record.subkey, raw=False): value}
        except Exception:
            raise ValidationError(f"value under {key!r} is not valid msgpack") from None
        try:
            self._adapters[name].validate_python(value, strict=True)
        except self._pydantic.ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'value'}: {err['msg']}" for err in e.errors()[:3])
            raise ValidationError(f"value under key {key!r} does not match {self.schema.__name__}.{name}: "
                                  f"{problems}") from None
