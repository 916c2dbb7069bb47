"""twistd plugin: ``twistd camgateway`` (the module is imported lazily)."""
from twisted.application.service import ServiceMaker

camgateway = ServiceMaker(
    "camgateway",
    "camgateway.runtime.tap",
    "Teltonika camera file-transfer gateway (DualCam, DashCam, DSM, ADAS)",
    "camgateway",
)
