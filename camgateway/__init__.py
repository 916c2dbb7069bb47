"""camgateway: receives photos and videos from Teltonika vehicle cameras."""

__version__ = "0.1.0"
