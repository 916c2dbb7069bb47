"""CRC-16 as Teltonika cameras compute it, at C speed.

The cameras use the reflected CCITT polynomial 0x8408 with no final xor (the
CRC-16/KERMIT algorithm, check value 0x2189 over ``b"123456789"``), chained:
the initial value of each DATA frame is the CRC of the frame before it.

The stdlib's :func:`binascii.crc_hqx` is the same CRC in its non-reflected
form (polynomial 0x1021). Reflecting the input bytes and the register turns
one into the other, so callers that hold bit-reversed copies of their bytes
(see :data:`REVERSE_BITS` and :class:`camgateway.codec.FrameDecoder`) get the
CRC with one C call and no per-byte Python work.
"""

from __future__ import annotations

from binascii import crc_hqx

__all__ = [
    "REVERSE_BITS",
    "reverse16",
    "crc16",
    "crc16_reversed",
    "crc16_combine",
]

#: ``bytes.translate`` table that reverses the bit order of every byte.
REVERSE_BITS: bytes = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))


def reverse16(value: int) -> int:
    """Reverse the bit order of a 16-bit value."""
    return (REVERSE_BITS[value & 0xFF] << 8) | REVERSE_BITS[value >> 8]


def crc16(data: bytes, init: int = 0) -> int:
    """CRC-16 (poly 0x8408, no final xor) of ``data``, chained from ``init``."""
    return reverse16(crc_hqx(bytes(data).translate(REVERSE_BITS), reverse16(init)))


def crc16_reversed(reversed_data: object, reversed_init: int) -> int:
    """The hot-path form: both input and result are in the bit-reversed domain.

    ``reversed_data`` is any buffer holding the data with :data:`REVERSE_BITS`
    applied; ``reversed_init`` is ``reverse16(init)``. The result is
    ``reverse16(crc16(data, init))``.
    """
    return crc_hqx(reversed_data, reversed_init)  # type: ignore[arg-type]


def _gf2_times(matrix: list[int], vector: int) -> int:
    total = 0
    i = 0
    while vector:
        if vector & 1:
            total ^= matrix[i]
        vector >>= 1
        i += 1
    return total


def _gf2_square(matrix: list[int]) -> list[int]:
    return [_gf2_times(matrix, matrix[n]) for n in range(16)]


def crc16_combine(crc_a: int, crc_b: int, length_b: int) -> int:
    """CRC of ``A + B`` from ``crc16(A)``, ``crc16(B)`` and ``len(B)``.

    Both CRCs start from 0. Because the CRC is linear with no final xor,
    ``crc16(B, init=c) == crc16(B) ^ crc16(b"\\0" * len(B), init=c)``; the
    second term is ``c`` pushed through ``len(B)`` zero bytes, computed in
    O(log n) by squaring the one-zero-bit operator (as zlib's
    ``crc32_combine``). Used to keep the whole-file CRC when the per-frame
    chain restarts at a SYNC.
    """
    if length_b <= 0:
        return crc_a
    # Operator for one zero bit in the reflected register.
    odd = [0x8408] + [1 << n for n in range(15)]
    even = _gf2_square(odd)  # two zero bits
    odd = _gf2_square(even)  # four zero bits
    while True:
        even = _gf2_square(odd)  # apply len2 zero bytes, one bit of length at a time
        if length_b & 1:
            crc_a = _gf2_times(even, crc_a)
        length_b >>= 1
        if not length_b:
            break
        odd = _gf2_square(even)
        if length_b & 1:
            crc_a = _gf2_times(odd, crc_a)
        length_b >>= 1
        if not length_b:
            break
    return crc_a ^ crc_b
