"""Runs many emulated cameras against a gateway, reconnecting as devices do."""

from __future__ import annotations

import random
from typing import Callable, Iterable, Optional

from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults
from twisted.internet.endpoints import connectProtocol
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.task import deferLater
from twisted.logger import Logger

from camgateway.sim.camera import Camera
from camgateway.sim.frames import PlanCache
from camgateway.sim.model import CameraSpec
from camgateway.sim.protocol import CameraProtocol
from camgateway.sim.result import CameraResult

__all__ = ["run_cameras", "run_camera"]

log = Logger()

EndpointFactory = Callable[[CameraSpec], IStreamClientEndpoint]


async def run_camera(
    reactor: IReactorTime,
    endpoint_factory: EndpointFactory,
    spec: CameraSpec,
    *,
    reconnect: bool = True,
    reconnect_delay: float = 0.05,
    max_connections_per_camera: int = 20,
    idle_timeout: Optional[float] = 30.0,
    plans: Optional[PlanCache] = None,
) -> CameraResult:
    """Play one camera until it has nothing pending or gives up.

    A connection that ends (or fails to open) while files are pending is
    retried after ``reconnect_delay``, as a device retries; after
    ``max_connections_per_camera`` attempts the camera gives up. A garbage
    camera connects once.
    """
    camera = Camera(spec)
    result = camera.result
    result.started = reactor.seconds()
    plans = plans or PlanCache()
    rng = random.Random(spec.imei)
    attempts = 0
    while True:
        attempts += 1
        protocol = CameraProtocol(camera, reactor, plans=plans, idle_timeout=idle_timeout, rng=rng)
        try:
            await connectProtocol(endpoint_factory(spec), protocol)
        except Exception as e:
            result.connect_failures += 1
            log.info("camera {imei}: connect failed: {error}", imei=spec.imei, error=e)
            last_failure = str(e)
        else:
            await protocol.closed
            last_failure = ""
        if spec.garbage or camera.done or not reconnect:
            break
        if attempts >= max_connections_per_camera:
            result.gave_up = True
            reason = f" (last: {last_failure})" if last_failure else ""
            result.errors.append(f"gave up after {attempts} connection attempts{reason}")
            break
        await deferLater(reactor, reconnect_delay)
    if not reconnect and not camera.done and not spec.garbage and result.connections == 0:
        result.errors.append(f"could not connect: {last_failure}")
    return camera.finish(reactor.seconds())


def run_cameras(
    reactor: IReactorTime,
    endpoint_factory: EndpointFactory,
    specs: Iterable[CameraSpec],
    *,
    concurrency: Optional[int] = None,
    reconnect: bool = True,
    reconnect_delay: float = 0.05,
    max_connections_per_camera: int = 20,
    idle_timeout: Optional[float] = 30.0,
    plans: Optional[PlanCache] = None,
) -> Deferred[list[CameraResult]]:
    """Play every camera of ``specs``; fires with their results, in order.

    ``endpoint_factory(spec)`` gives the endpoint each connection uses
    (``clientFromString(reactor, "tls:host=…:port=…")`` for TLS). At most
    ``concurrency`` cameras run at a time (all of them if None); a camera
    keeps its slot across its reconnects. ``idle_timeout`` aborts a
    connection on which the gateway stays silent that long.
    """
    plans = plans or PlanCache()
    semaphore = DeferredSemaphore(concurrency) if concurrency else None

    def one(spec: CameraSpec) -> Deferred[CameraResult]:
        def go() -> Deferred[CameraResult]:
            return Deferred.fromCoroutine(
                run_camera(
                    reactor,
                    endpoint_factory,
                    spec,
                    reconnect=reconnect,
                    reconnect_delay=reconnect_delay,
                    max_connections_per_camera=max_connections_per_camera,
                    idle_timeout=idle_timeout,
                    plans=plans,
                )
            )

        return semaphore.run(go) if semaphore is not None else go()

    return gatherResults([one(spec) for spec in specs], consumeErrors=True)
