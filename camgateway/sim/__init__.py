"""Teltonika camera emulator: plays devices (the TCP client side) against a gateway.

Fleet operators use it to test a gateway deployment; the test suite and the
benchmark use it as their load. The parts:

* :mod:`~camgateway.sim.model`: :class:`SimFile`, :class:`CameraSpec`;
* :mod:`~camgateway.sim.metadata`: METADATA payload builders;
* :mod:`~camgateway.sim.content`: real, random or on-disk files per camera kind;
* :mod:`~camgateway.sim.media`: the real photos and videos, made once with ffmpeg;
* :mod:`~camgateway.sim.frames`: precomputed DATA frames and CRC chains;
* :mod:`~camgateway.sim.sender`: flow-controlled, optionally paced output;
* :mod:`~camgateway.sim.camera`: device state across connections;
* :mod:`~camgateway.sim.protocol`: one connection, as PROTOCOL.md describes;
* :mod:`~camgateway.sim.runner`: :func:`run_cameras`;
* :mod:`~camgateway.sim.cli`: the ``camgateway-sim`` command.
"""

from camgateway.sim.camera import Camera
from camgateway.sim.content import ContentPool, files_from_dir, make_files, parse_size, random_jpeg, random_video
from camgateway.sim.metadata import adas_metadata, dsm_metadata, dualcam_metadata, json_metadata
from camgateway.sim.model import CameraSpec, SimFile
from camgateway.sim.protocol import CameraProtocol
from camgateway.sim.result import CameraResult
from camgateway.sim.runner import run_camera, run_cameras

__all__ = [
    "SimFile",
    "CameraSpec",
    "CameraResult",
    "Camera",
    "CameraProtocol",
    "run_cameras",
    "run_camera",
    "dualcam_metadata",
    "dsm_metadata",
    "adas_metadata",
    "json_metadata",
    "make_files",
    "files_from_dir",
    "ContentPool",
    "parse_size",
    "random_jpeg",
    "random_video",
]
