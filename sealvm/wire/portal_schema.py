"""Payload schemas of the portal: field types, their bounds, and the codec.

A schema is an ordered tuple of fields; a payload is the fields' encodings
concatenated, all little-endian, with no padding:

* `U8/U16/U32/U64/I32(name, lo=, hi=, mask=)`: fixed width; `lo`/`hi` bound the
  value, `mask` lists the bits that may be set (flags words);
* `Bytes(name, max)`: u32 length, then that many bytes (`length <= max`);
* `Str(name, max)`: u32 length, then UTF-8 (strict: no surrogates, no
  overlongs), `length <= max` bytes, no NUL;
* `Token(name)`: 16 raw bytes;
* `Enum(name, width, enum_cls)`: a U8/U16 that must be one of `enum_cls`'s
  values; decoded as the enum member.

Every bound is checked both when decoding (the peer is hostile) and when
encoding (a value that cannot be decoded must never be sent).  `decode_fields`
walks the schema once, iteratively; every read checks the bytes that remain
before it slices, so no allocation is larger than the payload it was given,
and the payload must be consumed exactly.

Failures raise `PortalError(status, message)`: the status is the reply the
core sends back.  Messages name fields, numbers and lengths, never the peer's
bytes, so they are safe to log.  Encoding failures raise `EncodeError`.
"""
from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import Any, Mapping


class Status(enum.IntEnum):
    """Reply status; also the verdict carried by every `PortalError`."""
    OK = 0
    BAD_VERSION = 1
    UNKNOWN_OP = 2
    BAD_KIND = 2          # alias: a frame kind the receiver does not accept
    BAD_CAPABILITY = 3
    TOO_BIG = 4
    OUT_OF_RANGE = 5
    MALFORMED = 5         # alias: truncated, trailing bytes, bad UTF-8, bad header fields
    WRONG_STATE = 6
    FAILED = 7


class PortalError(Exception):
    """A message was refused; `status` is the reply to send.

    `fatal` means the byte stream can no longer be framed (bad magic, a length
    over MAX_PAYLOAD, EOF inside a frame): answer once, then close that
    connection.  `seq`/`op` come from the offending header when it was read.
    """

    def __init__(self, status: Status | int, message: str, *, seq: int = 0, op: int = 0,
                 fatal: bool = False):
        super().__init__(message)
        self.status = Status(status)
        self.message = message
        self.seq = seq
        self.op = op
        self.fatal = fatal

    def __repr__(self) -> str:
        return f"PortalError({self.status.name}, {self.message!r}, seq={self.seq}, op={self.op})"


class EncodeError(PortalError):
    """Our own side tried to encode a value the schema does not allow (a local bug)."""

    def __init__(self, message: str):
        super().__init__(Status.OUT_OF_RANGE, message)


_LEN = struct.Struct("<I")
TOKEN_SIZE = 16


def _truncated(name: str, need: int, have: int) -> PortalError:
    return PortalError(Status.MALFORMED, f"field {name}: needs {need} bytes, {have} left")


@dataclass(frozen=True)
class Int:
    """A fixed-width integer field with inclusive bounds and an optional bit mask."""
    name: str
    fmt: str
    lo: int
    hi: int
    mask: int | None = None
    _st: struct.Struct = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_st", struct.Struct("<" + self.fmt))

    @property
    def max_size(self) -> int:
        return self._st.size

    def check(self, value: int) -> str | None:
        if value < self.lo or value > self.hi:
            return f"field {self.name}: {value} outside {self.lo}..{self.hi}"
        if self.mask is not None and value & ~self.mask:
            return f"field {self.name}: bits {value & ~self.mask:#x} must be zero"
        return None

    def decode(self, mv: memoryview, pos: int) -> tuple[int, int]:
        size = self._st.size
        if len(mv) - pos < size:
            raise _truncated(self.name, size, len(mv) - pos)
        (value,) = self._st.unpack_from(mv, pos)
        problem = self.check(value)
        if problem is not None:
            raise PortalError(Status.OUT_OF_RANGE, problem)
        return value, pos + size

    def encode(self, value: Any, out: bytearray) -> None:
        if not isinstance(value, int) or isinstance(value, bool):
            raise EncodeError(f"field {self.name}: expected int, got {type(value).__name__}")
        problem = self.check(value)
        if problem is not None:
            raise EncodeError(problem)
        out += self._st.pack(value)


def _int(fmt: str, full_lo: int, full_hi: int):
    def make(name: str, lo: int | None = None, hi: int | None = None,
             mask: int | None = None) -> Int:
        lo = full_lo if lo is None else lo
        hi = full_hi if hi is None else hi
        if not full_lo <= lo <= hi <= full_hi:
            raise ValueError(f"field {name}: bounds {lo}..{hi} do not fit '{fmt}'")
        return Int(name, fmt, lo, hi, mask)
    return make


U8 = _int("B", 0, 0xFF)
U16 = _int("H", 0, 0xFFFF)
U32 = _int("I", 0, 0xFFFF_FFFF)
U64 = _int("Q", 0, 0xFFFF_FFFF_FFFF_FFFF)
I32 = _int("i", -0x8000_0000, 0x7FFF_FFFF)


@dataclass(frozen=True)
class Bytes:
    """u32 length, then at most `max` bytes."""
    name: str
    max: int

    @property
    def max_size(self) -> int:
        return _LEN.size + self.max

    def _span(self, mv: memoryview, pos: int) -> tuple[int, int]:
        if len(mv) - pos < _LEN.size:
            raise _truncated(self.name, _LEN.size, len(mv) - pos)
        (n,) = _LEN.unpack_from(mv, pos)
        pos += _LEN.size
        if n > self.max:        # checked before anything of size n is touched
            raise PortalError(Status.TOO_BIG, f"field {self.name}: {n} bytes, max {self.max}")
        if len(mv) - pos < n:
            raise _truncated(self.name, n, len(mv) - pos)
        return pos, pos + n

    def decode(self, mv: memoryview, pos: int) -> tuple[bytes, int]:
        start, end = self._span(mv, pos)
        return mv[start:end].tobytes(), end

    def encode(self, value: Any, out: bytearray) -> None:
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise EncodeError(f"field {self.name}: expected bytes, got {type(value).__name__}")
        n = memoryview(value).nbytes
        if n > self.max:
            raise EncodeError(f"field {self.name}: {n} bytes, max {self.max}")
        out += _LEN.pack(n)
        out += value


@dataclass(frozen=True)
class Str(Bytes):
    """u32 length, then at most `max` bytes of strict UTF-8 without NUL."""

    def decode(self, mv: memoryview, pos: int) -> tuple[str, int]:  # type: ignore[override]
        start, end = self._span(mv, pos)
        raw = mv[start:end].tobytes()
        if b"\0" in raw:
            raise PortalError(Status.MALFORMED, f"field {self.name}: contains NUL")
        try:
            return raw.decode("utf-8", "strict"), end
        except UnicodeDecodeError:
            raise PortalError(Status.MALFORMED, f"field {self.name}: invalid UTF-8") from None

    def encode(self, value: Any, out: bytearray) -> None:
        if not isinstance(value, str):
            raise EncodeError(f"field {self.name}: expected str, got {type(value).__name__}")
        if "\0" in value:
            raise EncodeError(f"field {self.name}: contains NUL")
        try:
            raw = value.encode("utf-8", "strict")
        except UnicodeEncodeError:
            raise EncodeError(f"field {self.name}: not encodable as UTF-8") from None
        if len(raw) > self.max:
            raise EncodeError(f"field {self.name}: {len(raw)} bytes, max {self.max}")
        out += _LEN.pack(len(raw))
        out += raw


@dataclass(frozen=True)
class Token:
    """16 raw bytes (a capability token)."""
    name: str

    @property
    def max_size(self) -> int:
        return TOKEN_SIZE

    def decode(self, mv: memoryview, pos: int) -> tuple[bytes, int]:
        if len(mv) - pos < TOKEN_SIZE:
            raise _truncated(self.name, TOKEN_SIZE, len(mv) - pos)
        return mv[pos:pos + TOKEN_SIZE].tobytes(), pos + TOKEN_SIZE

    def encode(self, value: Any, out: bytearray) -> None:
        if not isinstance(value, (bytes, bytearray)) or len(value) != TOKEN_SIZE:
            raise EncodeError(f"field {self.name}: expected {TOKEN_SIZE} bytes")
        out += value


@dataclass(frozen=True)
class Enum:
    """A U8 or U16 whose value must be a member of `enum_cls`."""
    name: str
    width: Any                       # U8 or U16
    enum_cls: type[enum.IntEnum]
    _int: Int = field(init=False, repr=False, compare=False)
    _allowed: frozenset[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_int", self.width(self.name))
        object.__setattr__(self, "_allowed", frozenset(int(m) for m in self.enum_cls))
        if any(self._int.check(v) for v in self._allowed):
            raise ValueError(f"field {self.name}: enum values do not fit its width")

    @property
    def max_size(self) -> int:
        return self._int.max_size

    def decode(self, mv: memoryview, pos: int) -> tuple[enum.IntEnum, int]:
        value, pos = self._int.decode(mv, pos)
        if value not in self._allowed:
            raise PortalError(Status.OUT_OF_RANGE, f"field {self.name}: {value} is not allowed")
        return self.enum_cls(value), pos

    def encode(self, value: Any, out: bytearray) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value not in self._allowed:
            raise EncodeError(f"field {self.name}: {value!r} is not one of "
                              f"{sorted(self._allowed)}")
        self._int.encode(int(value), out)


Field = Int | Bytes | Str | Token | Enum
Schema = tuple[Field, ...]


def max_size(schema: Schema) -> int:
    """The largest payload `schema` can encode to."""
    return sum(f.max_size for f in schema)


def decode_some(schema: Schema, mv: memoryview, pos: int, out: dict[str, Any]) -> int:
    """Decode `schema` from `mv` at `pos` into `out`; return where it ended."""
    for f in schema:
        out[f.name], pos = f.decode(mv, pos)
    return pos


def decode_fields(schema: Schema, payload: bytes | bytearray | memoryview) -> dict[str, Any]:
    """Decode `payload` against `schema`; it must be consumed exactly."""
    mv = memoryview(payload).cast("B")
    out: dict[str, Any] = {}
    end = decode_some(schema, mv, 0, out)
    expect_end(mv, end)
    return out


def expect_end(mv: memoryview, pos: int) -> None:
    """Refuse bytes left over after the last field."""
    if pos != len(mv):
        raise PortalError(Status.MALFORMED, f"{len(mv) - pos} trailing bytes after the payload")


def encode_fields(schema: Schema, values: Mapping[str, Any]) -> bytes:
    """Encode exactly the fields of `schema` from `values`, checking every bound."""
    names = [f.name for f in schema]
    missing = [n for n in names if n not in values]
    extra = sorted(set(values) - set(names))
    if missing or extra:
        raise EncodeError(f"fields missing {missing}, unexpected {extra}")
    out = bytearray()
    for f in schema:
        f.encode(values[f.name], out)
    return bytes(out)
