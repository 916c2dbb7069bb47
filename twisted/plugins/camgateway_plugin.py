"""twistd plugin: ``twistd camgateway`` (the module is imported lazily)."""
from twisted.application.service import ServiceMaker

camgateway = ServiceMaker(
    "camgateway",
    "camgateway.tap",
    "Teltonika camera file-transfer gateway (DualCam, DashCam, DSM, ADAS)",
    "camgateway",
)
