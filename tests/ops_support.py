"""Helpers of the operations tests: HTTP requests, polling, a real JPEG, a certificate."""

from __future__ import annotations

import base64
import datetime
import json
import struct
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

from twisted.internet import defer, reactor
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from camgateway.sim import CameraSpec
from camgateway.sim.content import name_files
from tests.support import poll
from tests.test_integration import IMEI_BASE, GatewayTestCase


@defer.inlineCallbacks
def http_get(url: str, headers: Optional[dict[str, str]] = None, agent: Any = None) -> Any:
    """GET ``url``: (status code, headers, body bytes)."""
    agent = agent or Agent(reactor)
    raw = Headers({k.encode(): [v.encode()] for k, v in (headers or {}).items()})
    response = yield agent.request(b"GET", url.encode(), raw)
    with warnings.catch_warnings():  # Agent's HTTP/1.1 transport proxy has no abortConnection
        warnings.simplefilter("ignore", DeprecationWarning)
        body = yield readBody(response)
    return response.code, response.headers, body


@defer.inlineCallbacks
def get_json(url: str, headers: Optional[dict[str, str]] = None) -> Any:
    """GET ``url`` and decode its JSON body (the status must be 200)."""
    code, _, body = yield http_get(url, headers)
    if code != 200:
        raise AssertionError(f"GET {url}: {code} {body[:200]!r}")
    return json.loads(body)


def basic(user: str, password: str) -> str:
    """An HTTP basic Authorization header value."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# -- a real JPEG (the emulator's photos are random bytes behind a JPEG header)

def _huffman_codes(bits: list[int], values: list[int]) -> dict[int, tuple[int, int]]:
    """Canonical Huffman codes (JPEG Annex C): value -> (code, length)."""
    codes, code, k = {}, 0, 0
    for length in range(1, 17):
        for _ in range(bits[length - 1]):
            codes[values[k]] = (code, length)
            code += 1
            k += 1
        code <<= 1
    return codes


_DC_BITS = [0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]  # Annex K.3, luminance DC
_DC_VALUES = list(range(12))
_AC_BITS = [1] + [0] * 15  # one symbol: end of block
_AC_VALUES = [0x00]


def tiny_jpeg(width: int = 96, height: int = 64,
              colour: Callable[[int, int], tuple[int, int, int]] = lambda bx, by: (40 + bx * 20, 80 + by * 20, 160)) -> bytes:
    """A baseline JPEG of ``width`` x ``height`` pixels made of flat 8x8 blocks.

    Each block has only a DC coefficient, so no DCT is needed; ``colour``
    gives the RGB of block (bx, by). Decodable by any browser.
    """
    assert width % 8 == 0 and height % 8 == 0
    dc = _huffman_codes(_DC_BITS, _DC_VALUES)
    ac = _huffman_codes(_AC_BITS, _AC_VALUES)
    out = bytearray(b"\xff\xd8")
    out += b"\xff\xe0" + struct.pack(">H5sBBBHHBB", 16, b"JFIF\0", 1, 1, 0, 1, 1, 0, 0)
    out += b"\xff\xdb" + struct.pack(">HB", 67, 0) + bytes([1] * 64)  # quantisation: all 1
    out += b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, height, width, 3)
    for component in (1, 2, 3):
        out += bytes([component, 0x11, 0])
    out += b"\xff\xc4" + struct.pack(">HB", 2 + 17 + len(_DC_VALUES), 0x00) + bytes(_DC_BITS) + bytes(_DC_VALUES)
    out += b"\xff\xc4" + struct.pack(">HB", 2 + 17 + len(_AC_VALUES), 0x10) + bytes(_AC_BITS) + bytes(_AC_VALUES)
    out += b"\xff\xda" + struct.pack(">HB", 12, 3) + bytes([1, 0x00, 2, 0x00, 3, 0x00]) + bytes([0, 63, 0])
    bitbuf, nbits, scan = 0, 0, bytearray()

    def put(code: int, length: int) -> None:
        nonlocal bitbuf, nbits
        bitbuf, nbits = (bitbuf << length) | code, nbits + length
        while nbits >= 8:
            byte = (bitbuf >> (nbits - 8)) & 0xFF
            scan.append(byte)
            if byte == 0xFF:
                scan.append(0)
            nbits -= 8
        bitbuf &= (1 << nbits) - 1

    previous = [0, 0, 0]
    for by in range(height // 8):
        for bx in range(width // 8):
            r, g, b = colour(bx, by)
            ycc = (0.299 * r + 0.587 * g + 0.114 * b,
                   128 - 0.168736 * r - 0.331264 * g + 0.5 * b,
                   128 + 0.5 * r - 0.418688 * g - 0.081312 * b)
            for c, value in enumerate(ycc):
                coefficient = round(8 * (max(0.0, min(255.0, value)) - 128))
                diff, previous[c] = coefficient - previous[c], coefficient
                size = abs(diff).bit_length()
                put(*dc[size])
                if size:
                    put(diff if diff > 0 else diff + (1 << size) - 1, size)
                put(*ac[0])
    if nbits:
        put((1 << (8 - nbits)) - 1, 8 - nbits)
    out += scan + b"\xff\xd9"
    return bytes(out)


# -- a self-signed certificate for 127.0.0.1

def self_signed(directory: Path) -> tuple[Path, Path]:
    """Write ``cert.pem`` (for 127.0.0.1 and localhost) into ``directory``, its key into ``directory/private``.

    ``directory`` can then be a ``trustRoots=`` folder: Twisted loads every
    file there as a certificate (a key file beside them makes it fail).
    """
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "camgateway test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    (directory / "private").mkdir(parents=True, exist_ok=True)
    key_path, cert_path = directory / "private" / "key.pem", directory / "cert.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


# -- a running gateway with the status web service

def jpeg_camera(n: int, jpeg: bytes, video: bytes = b"", kind: str = "dualcam", **kw: Any) -> CameraSpec:
    """A camera sending a real JPEG (and a video when given), with metadata."""
    items = [(True, jpeg, None)] + ([(False, video, None)] if video else [])
    files = name_files(kind, kw.pop("protocol_id", 5), items)
    return CameraSpec(imei=IMEI_BASE + n, kind=kind, files=tuple(files), **kw)


class OpsTestCase(GatewayTestCase):
    """A real gateway with its status web service on 127.0.0.1, port 0."""

    @defer.inlineCallbacks
    def start_ops(self, **config: Any) -> Any:
        config.setdefault("http_listen", ("tcp:0:interface=127.0.0.1",))
        yield self.start_gateway(**config)
        self.base = f"http://127.0.0.1:{self.top.status.ports[0].getHost().port}/"

    def url(self, path: str) -> str:
        return self.base + path

    @defer.inlineCallbacks
    def settled(self, files: int) -> Any:
        """Wait until ``files`` files are stored by every sink; their /api/files entries."""
        def stored() -> Any:
            d = get_json(self.url(f"api/files?limit={files + 10}"))
            return d.addCallback(lambda listed: listed if len(listed) >= files and all(
                f["url"] for f in listed) else None)

        listed = yield poll(stored, what=f"{files} stored files in /api/files")
        return listed
