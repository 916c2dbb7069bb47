"""Tests for camgateway.wire.crc: the cameras' CRC-16 (PROTOCOL.md section 5.5)."""

from __future__ import annotations

import random

from twisted.trial import unittest

from camgateway.wire.crc import FAST, REVERSE_BITS, _crc16_stdlib, crc16, crc16_combine, reverse16


def reference_crc16(data: bytes, init: int = 0) -> int:
    """The textbook bitwise CRC-16: reflected polynomial 0x8408, no final xor."""
    crc = init
    for byte in data:
        crc ^= byte
        for _ in range(8):
            if crc & 1:
                crc = (crc >> 1) ^ 0x8408
            else:
                crc >>= 1
    return crc


def reference_reverse16(value: int) -> int:
    """Bit reversal of a 16-bit value, one bit at a time."""
    out = 0
    for bit in range(16):
        if value & (1 << bit):
            out |= 1 << (15 - bit)
    return out


class ReferenceTests(unittest.TestCase):
    """The test's own reference is itself right, so comparing against it means something."""

    def test_reference_check_value(self) -> None:
        self.assertEqual(reference_crc16(b"123456789"), 0x2189)

    def test_reference_is_not_trivial(self) -> None:
        self.assertNotEqual(reference_crc16(b"\x01"), reference_crc16(b"\x02"))
        self.assertNotEqual(reference_crc16(b"a", 1), reference_crc16(b"a", 0))


class BitReversalTests(unittest.TestCase):
    """REVERSE_BITS and reverse16 reverse the bit order exactly."""

    def test_reverse_bits_table(self) -> None:
        self.assertEqual(len(REVERSE_BITS), 256)
        for i in range(256):
            expected = int(f"{i:08b}"[::-1], 2)
            self.assertEqual(REVERSE_BITS[i], expected, i)
        self.assertEqual(REVERSE_BITS[0x01], 0x80)
        self.assertEqual(REVERSE_BITS[0xF0], 0x0F)

    def test_reverse16(self) -> None:
        rng = random.Random(16)
        for value in [0, 1, 0x8000, 0xFFFF, 0x1234, 0x8408] + [rng.randrange(0x10000) for _ in range(200)]:
            self.assertEqual(reverse16(value), reference_reverse16(value), hex(value))
            self.assertEqual(reverse16(reverse16(value)), value)
        self.assertEqual(reverse16(0x0001), 0x8000)
        self.assertEqual(reverse16(0x8408), 0x1021)


class Crc16Tests(unittest.TestCase):
    """crc16 is CRC-16/KERMIT without final xor, chainable from any init."""

    def test_check_value(self) -> None:
        self.assertEqual(crc16(b"123456789"), 0x2189)

    def test_empty_returns_init(self) -> None:
        self.assertEqual(crc16(b""), 0)
        self.assertEqual(crc16(b"", 0xBEEF), 0xBEEF)

    def test_matches_reference_random(self) -> None:
        rng = random.Random(1234)
        for _ in range(300):
            data = rng.randbytes(rng.randrange(0, 200))
            init = rng.randrange(0x10000)
            self.assertEqual(crc16(data, init), reference_crc16(data, init), (data.hex(), init))

    def test_matches_reference_default_init(self) -> None:
        rng = random.Random(99)
        for _ in range(100):
            data = rng.randbytes(rng.randrange(1, 1025))
            self.assertEqual(crc16(data), reference_crc16(data))

    def test_accepts_buffers(self) -> None:
        data = b"hello camera"
        self.assertEqual(crc16(bytearray(data), 7), crc16(data, 7))
        self.assertEqual(crc16(memoryview(data), 7), crc16(data, 7))

    def test_chaining(self) -> None:
        rng = random.Random(7)
        for _ in range(200):
            a = rng.randbytes(rng.randrange(0, 100))
            b = rng.randbytes(rng.randrange(0, 100))
            self.assertEqual(crc16(a + b), crc16(b, crc16(a)))
            init = rng.randrange(0x10000)
            self.assertEqual(crc16(a + b, init), crc16(b, crc16(a, init)))

    def test_chaining_many_frames(self) -> None:
        """The device's frame-by-frame chain equals the CRC of the whole run."""
        rng = random.Random(8)
        frames = [rng.randbytes(1024) for _ in range(20)] + [rng.randbytes(17)]
        chained = 0
        for frame in frames:
            chained = crc16(frame, chained)
        self.assertEqual(chained, crc16(b"".join(frames)))
        self.assertEqual(chained, reference_crc16(b"".join(frames)))


class ImplementationTests(unittest.TestCase):
    """The fast C CRC and the stdlib fallback agree with the reference, on any buffer."""

    def test_both_match_reference(self) -> None:
        rng = random.Random(42)
        for _ in range(300):
            data = rng.randbytes(rng.randrange(0, 300))
            init = rng.randrange(0x10000)
            expected = reference_crc16(data, init)
            self.assertEqual(crc16(data, init), expected)
            self.assertEqual(_crc16_stdlib(data, init), expected)

    def test_accepts_memoryview_slices(self) -> None:
        data = bytearray(b"xx" + bytes(range(256)) + b"yy")
        view = memoryview(data)[2:-2]
        try:
            self.assertEqual(crc16(view, 0x1D0F), reference_crc16(bytes(range(256)), 0x1D0F))
            self.assertEqual(_crc16_stdlib(view, 0x1D0F), reference_crc16(bytes(range(256)), 0x1D0F))
        finally:
            view.release()

    def test_fast_implementation_installed(self) -> None:
        self.assertTrue(FAST, "fastcrc is a dependency: the hot path should not fall back to crc_hqx")


class Crc16CombineTests(unittest.TestCase):
    """crc16_combine gives the CRC of a concatenation from the parts' CRCs."""

    def check(self, a: bytes, b: bytes) -> None:
        self.assertEqual(crc16_combine(crc16(a), crc16(b), len(b)), crc16(a + b), (len(a), len(b)))

    def test_random_parts(self) -> None:
        rng = random.Random(2024)
        for _ in range(200):
            self.check(rng.randbytes(rng.randrange(0, 300)), rng.randbytes(rng.randrange(0, 300)))

    def test_every_small_length(self) -> None:
        rng = random.Random(5)
        a = rng.randbytes(33)
        for n in range(0, 70):
            self.check(a, rng.randbytes(n))

    def test_powers_of_two_and_neighbours(self) -> None:
        rng = random.Random(6)
        a = rng.randbytes(50)
        for k in range(0, 14):
            for n in (2**k - 1, 2**k, 2**k + 1):
                if n >= 0:
                    self.check(a, rng.randbytes(n))

    def test_empty_parts(self) -> None:
        rng = random.Random(3)
        data = rng.randbytes(100)
        self.check(b"", data)
        self.check(data, b"")
        self.check(b"", b"")
        self.assertEqual(crc16_combine(0x1234, 0, 0), 0x1234)

    def test_zero_bytes(self) -> None:
        """All-zero parts: crc16(B) is 0, so only the shift by len(B) counts."""
        a = b"\x01\x02\x03"
        for n in (1, 2, 3, 1000):
            self.check(a, bytes(n))
        self.assertNotEqual(crc16_combine(crc16(a), 0, 1), crc16(a))

    def test_lengths_beyond_65536(self) -> None:
        rng = random.Random(65536)
        a = rng.randbytes(1000)
        for n in (65535, 65536, 65537, 70000, 200_003):
            self.check(a, rng.randbytes(n))

    def test_three_way(self) -> None:
        rng = random.Random(11)
        a, b, c = (rng.randbytes(n) for n in (300, 5000, 77))
        ab = crc16_combine(crc16(a), crc16(b), len(b))
        self.assertEqual(crc16_combine(ab, crc16(c), len(c)), crc16(a + b + c))

    def test_whole_file_across_a_sync_restart(self) -> None:
        """The use in the gateway: the chain restarts at 0 after a SYNC."""
        rng = random.Random(12)
        before = [rng.randbytes(1024) for _ in range(5)]
        after = [rng.randbytes(1024) for _ in range(4)] + [rng.randbytes(100)]
        run_a = 0
        for frame in before:
            run_a = crc16(frame, run_a)
        run_b = 0
        for frame in after:
            run_b = crc16(frame, run_b)
        whole = crc16_combine(run_a, run_b, sum(map(len, after)))
        self.assertEqual(whole, reference_crc16(b"".join(before + after)))
