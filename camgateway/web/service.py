"""The status web service: listens on ``http.listen`` once the gateway is ready."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python.failure import Failure

from camgateway.base.reasons import StartError, listen_error
from camgateway.web.status import StatusRoot, StatusSite

if TYPE_CHECKING:
    from camgateway.runtime.config import Config

__all__ = ["StatusService"]

log = Logger(namespace="camgateway.web")


class StatusService(Service):
    """Serves :class:`~camgateway.web.status.StatusRoot` on every ``http.listen`` endpoint.

    It starts listening when ``gateway.ready`` fires (the gateway's
    :class:`~camgateway.runtime.context.Services` exist only then) and makes
    ``gateway.ready`` wait for it, so that "ready" means every port is open.
    An endpoint that cannot listen fails the start as the camera ports do:
    the gateway logs why in one line naming ``http.listen[i]`` and stops
    (:meth:`~camgateway.runtime.service.GatewayService.cannot_start`), and
    ``gateway.ready`` fails.
    """

    def __init__(self, gateway: Any, config: Config, reactor: Any = None) -> None:
        self.gateway = gateway
        self.config = config
        self._reactor = reactor
        self.ports: list[Any] = []
        self.root: Any = None

    @property
    def reactor(self) -> Any:
        if self._reactor is None:
            from twisted.internet import reactor

            return reactor
        return self._reactor

    def startService(self) -> None:
        super().startService()
        self.gateway.ready.addCallback(self._gateway_ready)

    def _gateway_ready(self, result: Any) -> Any:
        if not self.running:
            return result
        d = self._listen()
        d.addCallbacks(lambda _: result, self._cannot_listen)
        return d

    def _cannot_listen(self, failure: Failure) -> Failure:
        self.gateway.cannot_start(failure)
        return failure

    @defer.inlineCallbacks
    def _listen(self) -> Any:
        self.root = StatusRoot(self.gateway, self.config.http_token)
        site = StatusSite(self.root)
        for i, description in enumerate(self.config.http_listen):
            try:
                port = yield serverFromString(self.reactor, description).listen(site)
            except Exception as e:
                raise StartError(f"http.listen[{i}]", f"status web service: cannot listen on {description!r}:"
                                                      f" {listen_error(e)}") from None
            self.ports.append(port)
            log.info("status web service on {description} ({address}){auth}", description=description,
                     address=port.getHost(), auth="" if self.config.http_token else " without a token")
        return self.ports

    def stopService(self) -> defer.Deferred:
        super().stopService()
        ports, self.ports = self.ports, []
        return defer.gatherResults([defer.maybeDeferred(port.stopListening) for port in ports])
