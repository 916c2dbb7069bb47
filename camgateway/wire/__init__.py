"""The wire layer: bytes to frames and back (codec, CRC, metadata layouts, status codes, PTMF, media kinds).

No Twisted and no I/O; imports nothing else of camgateway.
"""
