"""Minimal TFRecord + tf.train.SequenceExample codec (no TensorFlow): enough for YouTube-8M frame-level files.

TFRecord framing: ``uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)``.
Protobuf subset: SequenceExample{context: Features=1, feature_lists: FeatureLists=2}; Features{map feature=1};
Feature{bytes_list=1, float_list=2, int64_list=3}; FeatureLists{map feature_list=1}; FeatureList{feature=1}.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any, BinaryIO

_POLY = 0x82F63B78
_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ _POLY if _c & 1 else _c >> 1
    _TABLE.append(_c)


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def write_records(f: BinaryIO, records: list[bytes]) -> None:
    for r in records:
        header = struct.pack("<Q", len(r))
        f.write(header + struct.pack("<I", masked_crc(header)) + r + struct.pack("<I", masked_crc(r)))


def read_records(f: BinaryIO, *, check_crc: bool = True) -> Iterator[bytes]:
    while True:
        header = f.read(8)
        if not header:
            return
        if len(header) < 8:
            raise ValueError("truncated TFRecord header")
        (length,) = struct.unpack("<Q", header)
        (hcrc,) = struct.unpack("<I", f.read(4))
        data = f.read(length)
        (dcrc,) = struct.unpack("<I", f.read(4))
        if len(data) < length:
            raise ValueError("truncated TFRecord data")
        if check_crc and (hcrc != masked_crc(header) or dcrc != masked_crc(data)):
            raise ValueError("TFRecord CRC mismatch (corrupt file)")
        yield data


# ---------- protobuf wire format ----------
def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(num: int, payload: bytes) -> bytes:
    return _varint((num << 3) | 2) + _varint(len(payload)) + payload


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int, Any]]:
    i = 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            val, i = _read_varint(buf, i)
        elif wire == 2:
            n, i = _read_varint(buf, i)
            val, i = buf[i : i + n], i + n
        elif wire == 5:
            val, i = buf[i : i + 4], i + 4
        elif wire == 1:
            val, i = buf[i : i + 8], i + 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield num, wire, val


def encode_feature(value: Any) -> bytes:
    """bytes / list[bytes] -> bytes_list; list[float] -> float_list; list[int] -> int64_list."""
    if isinstance(value, bytes):
        value = [value]
    if value and isinstance(value[0], bytes):
        return _field(1, b"".join(_field(1, v) for v in value))
    if value and isinstance(value[0], float):
        return _field(2, _field(1, struct.pack(f"<{len(value)}f", *value)))
    return _field(3, _field(1, b"".join(_varint(int(v)) for v in value)))


def decode_feature(buf: bytes) -> list[Any]:
    for num, _, val in _fields(buf):
        items: list[Any] = []
        for _n, wire, v in _fields(val):
            if num == 1:
                items.append(bytes(v))
            elif num == 2:
                items.extend(struct.unpack(f"<{len(v) // 4}f", v) if wire == 2 else struct.unpack("<f", v))
            elif num == 3:
                if wire == 2:
                    j = 0
                    while j < len(v):
                        x, j = _read_varint(v, j)
                        items.append(x - (1 << 64) if x >= 1 << 63 else x)
                else:
                    items.append(v - (1 << 64) if v >= 1 << 63 else v)
        return items
    return []


def _map_entry(key: str, value: bytes) -> bytes:
    return _field(1, key.encode()) + _field(2, value)


def encode_sequence_example(context: dict[str, Any], feature_lists: dict[str, list[Any]]) -> bytes:
    ctx = b"".join(_field(1, _map_entry(k, encode_feature(v))) for k, v in context.items())
    fl = b"".join(
        _field(1, _map_entry(k, b"".join(_field(1, encode_feature(x)) for x in seq))) for k, seq in feature_lists.items()
    )
    return _field(1, ctx) + _field(2, fl)


def _decode_map(buf: bytes) -> Iterator[tuple[str, bytes]]:
    for _, _, entry in _fields(buf):
        key, value = "", b""
        for n, _, v in _fields(entry):
            if n == 1:
                key = bytes(v).decode()
            elif n == 2:
                value = bytes(v)
        yield key, value


def decode_sequence_example(buf: bytes) -> tuple[dict[str, list[Any]], dict[str, list[list[Any]]]]:
    context: dict[str, list[Any]] = {}
    lists: dict[str, list[list[Any]]] = {}
    for num, _, val in _fields(buf):
        if num == 1:
            for k, v in _decode_map(val):
                context[k] = decode_feature(v)
        elif num == 2:
            for k, v in _decode_map(val):
                lists[k] = [decode_feature(f) for _, _, f in _fields(v)]
    return context, lists
