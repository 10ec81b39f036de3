"""Record validators: run on every store and on every value a lookup returns.

- :class:`SignatureValidator`: a key or subkey containing ``[owner:<base58 Ed25519 public key>]``
  can only be written with that owner's signature over msgpack([key, subkey, value, expiration]),
  appended to the stored value as ``[signature:<64 bytes>]``. Others cannot overwrite it (no
  signature), change it (the signature breaks) or extend an old one (the expiration is signed, and a
  replayed older record loses to the newer one). Storage protects signed *subkeys* further: a key
  holding one accepts only subkeys, so no unsigned plain value can replace or hide the dictionary
  (see :mod:`dht.storage`, :func:`has_owner_marker`).
- :class:`SchemaValidator`: values under given keys must match a pydantic model's field types,
  strictly (no coercion). A field typed as a dictionary governs a DHT dictionary: only subkeys may
  be stored under its key (a plain value there, even a dict, is rejected: it would replace the
  dictionary's subkeys).

Validators see serialized records (:class:`DHTRecord`, msgpack bytes) and are chained by
:class:`CompositeValidator`: signing in increasing ``priority``, validating and stripping in
decreasing priority (so the signature is checked, then removed, before schemas see the value).
Validators that can be merged are (:meth:`RecordValidator.merge_with`): all the schema validators of
a node become one :class:`MergedSchemaValidator`, so each application's schema governs only its own
keys (a key is checked by the schemas that have a field for it, and one that no schema has passes
if any of them allows extra keys), and several applications can share one DHT.
"""

from __future__ import annotations

import collections.abc
import re
import types
import typing
from dataclasses import dataclass, replace
from typing import Any, Iterable, Mapping

import msgpack

from .peer.identity import Identity, b58decode, b58encode, verify_signature
from .peer.untrusted import brief

__all__ = ["DHTRecord", "ValidationError", "RecordValidator", "CompositeValidator", "SignatureValidator",
           "SchemaValidator", "MergedSchemaValidator", "has_owner_marker"]


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

    def merge_with(self, other: "RecordValidator") -> "RecordValidator | None":
        """One validator doing the work of both ``self`` and ``other`` (neither is changed), or None
        (the default): they stay separate in a chain, and a record must pass both."""
        return None


class CompositeValidator(RecordValidator):
    """Validators applied as one (see the module docstring); ``validators``: the chain, by priority,
    with mergeable ones merged (:meth:`RecordValidator.merge_with`) and duplicates left out."""

    def __init__(self, validators: Iterable[RecordValidator] = ()):
        self.validators: list[RecordValidator] = []
        self.extend(validators)

    def extend(self, validators: Iterable[RecordValidator]) -> None:
        """Add validators (idempotent: adding one already in the chain changes nothing)."""
        for validator in validators:
            if any(v is validator for v in self.validators):
                continue
            for index, existing in enumerate(self.validators):
                merged = existing.merge_with(validator)
                if merged is not None:
                    self.validators[index] = merged
                    break
            else:
                self.validators.append(validator)
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
        except ValueError:  # not base58: not a marker, look further
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
                except ValueError:  # not base58: not a marker
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


def _is_dictionary(annotation: Any) -> bool:
    """Whether a field's type is a mapping (``dict[...]``, ``Mapping[...]``, optionally within
    ``Optional``/``Annotated``): such a field's key holds a DHT dictionary (subkeys only)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _is_dictionary(typing.get_args(annotation)[0])
    if origin is typing.Union or origin is types.UnionType:
        arms = [a for a in typing.get_args(annotation) if a is not type(None)]
        return bool(arms) and all(_is_dictionary(a) for a in arms)
    candidate = origin if origin is not None else annotation
    return isinstance(candidate, type) and issubclass(candidate, collections.abc.Mapping)


def _problem(error: Mapping[str, Any]) -> str:
    """One pydantic error as ``where: what``, bounded (its location holds untrusted subkeys)."""
    where = ".".join(part if isinstance(part, str) and len(part) <= 40 else brief(part, 40)
                     for part in error.get("loc", ())[:8])
    return f"{where or 'value'}: {str(error.get('msg', 'invalid'))[:200]}"


def _unpack_key(record: DHTRecord) -> Any:
    try:
        return msgpack.unpackb(record.key, raw=False)
    except Exception:  # noqa: BLE001 - whatever msgpack raises for these bytes: the record is invalid
        raise ValidationError("key is not valid msgpack") from None


class SchemaValidator(RecordValidator):
    """Values must match a pydantic model: field ``name`` governs the key ``name``, or
    ``{prefix}{separator}{name}`` with a ``prefix`` (``separator`` defaults to ``"_"``), or the keys
    that fully match ``patterns[name]`` (a regular expression; such a field governs no other key).

    For a regular value the field's type checks the value; for a subkey the field's type checks
    ``{subkey: value}`` (declare it as a ``dict[...]``). A field typed as a dictionary accepts
    subkeys only: a regular value under its key (a plain dict included) is rejected, as it would
    replace the dictionary. Checking is strict: no type coercion. Keys that are not fields pass when
    ``allow_extra_keys`` (default) is set. In a node's chain, schema validators are merged into one
    :class:`MergedSchemaValidator` (each governs its own keys).
    """

    priority = 5

    def __init__(self, schema: Any, prefix: str | None = None, allow_extra_keys: bool = True, *,
                 separator: str = "_", patterns: Mapping[str, str] | None = None):
        import pydantic

        self._pydantic = pydantic
        self.schema, self.prefix, self.allow_extra_keys = schema, prefix, allow_extra_keys
        self.separator = separator
        fields = schema.model_fields
        unknown = [name for name in (patterns or {}) if name not in fields]
        if unknown:
            raise ValueError(f"patterns name fields that {schema.__name__} lacks: {unknown}")
        self.patterns = {name: re.compile(pattern) for name, pattern in (patterns or {}).items()}
        self._adapters = {name: pydantic.TypeAdapter(f.annotation, config=None) for name, f in fields.items()}
        self._dictionaries = {name for name, f in fields.items() if _is_dictionary(f.annotation)}
        self._identity = (schema, prefix, separator, tuple(sorted((n, p.pattern) for n, p in self.patterns.items())),
                          allow_extra_keys)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SchemaValidator) and other._identity == self._identity

    def __hash__(self) -> int:
        return hash(self._identity)

    def field_of(self, key: Any) -> str | None:
        """The name of the field governing ``key`` (an unpacked key), or None: not this schema's business."""
        if not isinstance(key, str):
            return None
        for name, pattern in self.patterns.items():
            if pattern.fullmatch(key):
                return name
        if self.prefix is not None:
            if not key.startswith(self.prefix + self.separator):
                return None
            key = key[len(self.prefix) + len(self.separator):]
        return key if key in self._adapters and key not in self.patterns else None

    def validate(self, record: DHTRecord) -> None:
        key = _unpack_key(record)
        name = self.field_of(key)
        if name is None:
            if self.allow_extra_keys:
                return
            raise ValidationError(f"key {brief(key)} is not allowed by schema {self.schema.__name__}")
        self.check(key, name, record)

    def check(self, key: Any, name: str, record: DHTRecord) -> None:
        """Check ``record`` (under the unpacked ``key``) against field ``name``; ValidationError if it fails."""
        where = f"{self.schema.__name__}.{name}"
        if record.subkey is None and name in self._dictionaries:
            raise ValidationError(f"key {brief(key)} holds a dictionary ({where}): store each entry under "
                                  "its subkey, not a plain value")
        try:
            value = msgpack.unpackb(record.value, raw=False, strict_map_key=False)
            if record.subkey is not None:
                value = {msgpack.unpackb(record.subkey, raw=False): value}
        except Exception:  # noqa: BLE001 - whatever msgpack raises for these bytes: the record is invalid
            raise ValidationError(f"value under {brief(key)} is not valid msgpack") from None
        try:
            self._adapters[name].validate_python(value, strict=True)
        except self._pydantic.ValidationError as e:
            problems = "; ".join(_problem(err) for err in e.errors()[:3])
            raise ValidationError(f"value under key {brief(key)} does not match {where}: {problems}") from None

    def merge_with(self, other: RecordValidator) -> RecordValidator | None:
        if isinstance(other, (SchemaValidator, MergedSchemaValidator)):
            return MergedSchemaValidator([self]).merge_with(other)
        return None


class MergedSchemaValidator(RecordValidator):
    """Several :class:`SchemaValidator` as one (``parts``, duplicates left out): a key is checked by
    every schema with a field for it (each must pass); a key that no schema has passes if any of
    them allows extra keys. So each application's schema governs only its own keys."""

    priority = SchemaValidator.priority

    def __init__(self, parts: Iterable[SchemaValidator]):
        self.parts: tuple[SchemaValidator, ...] = ()
        for part in parts:
            if part not in self.parts:
                self.parts += (part,)

    def merge_with(self, other: RecordValidator) -> RecordValidator | None:
        if isinstance(other, SchemaValidator):
            return self if other in self.parts else MergedSchemaValidator([*self.parts, other])
        if isinstance(other, MergedSchemaValidator):
            return MergedSchemaValidator([*self.parts, *other.parts])
        return None

    def validate(self, record: DHTRecord) -> None:
        key = _unpack_key(record)
        governed = False
        for part in self.parts:
            name = part.field_of(key)
            if name is not None:
                governed = True
                part.check(key, name, record)
        if not governed and not any(part.allow_extra_keys for part in self.parts):
            names = ", ".join(part.schema.__name__ for part in self.parts)
            raise ValidationError(f"key {brief(key)} is not allowed by schemas {names}")
