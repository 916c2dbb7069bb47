"""pytest set-up: the slow tests, and a temporary working directory (trial's mktemp() writes under it).

Two runs (setup.cfg's ``addopts`` deselects the slow tests by default):

- ``pytest``: the fast run, unit and in-memory tests, in about half a minute;
- ``pytest -m slow``: the tests of :data:`SLOW`, which start real components
  (twistd or the gateway's own command in a subprocess, redis-server,
  haproxy, chromium, ffmpeg) or take more than about a second.

Together they run every test once (``pytest -m "slow or not slow"`` runs both).
"""

from __future__ import annotations

import os
from typing import Iterator

import pytest

#: The slow tests, each a test file, a class in it or one of its tests (``file::Class::test``),
#: with what makes it slow. An entry that names nothing in a file that was collected is an error.
SLOW: dict[str, str] = {
    # Real components.
    "test_browser.py": "chromium",
    "test_twistd.py::TwistdTests": "twistd",
    "test_twistd.py::StartFailureTests": "twistd",
    "test_serve.py": "twistd and the emulator as subprocesses",
    "test_workers.py::TwistdWorkersTests": "twistd with worker processes, haproxy",
    "test_workers.py::TwistdWorkersStatusTests": "twistd with worker processes",
    "test_logs.py::TwistdLogTests": "twistd",
    "test_scaleout.py": "redis-server, haproxy, several gateways",
    "test_outages.py": "redis-server, twistd, the emulator as subprocesses",
    "test_redis_store.py::RedisStoreTests": "redis-server",
    "test_redis_store.py::RedisOutboxStoreTests": "redis-server",
    "test_redis_store.py::RedisInstancesTests": "redis-server",
    "test_redis_store.py::RedisLeasesTests": "redis-server",
    "test_redis_store.py::SpoolFilesNotHereTests": "redis-server",
    "test_redis_store.py::SharedSpoolTests": "redis-server",
    "test_periodic.py::RedisKeeperTests": "redis-server",
    "test_chains.py::SharedStoreRetryTests": "redis-server",
    "test_chains.py::CommandLineTests": "the gateway's command in a subprocess",
    "test_config_ops.py::CheckConfigTests": "the gateway's command in a subprocess",
    "test_config_ops.py::EndpointCheckTests::test_check_config_command": "the gateway's command in a subprocess",
    "test_config_ops.py::SinkChainTests": "twistd and the gateway's command in subprocesses",
    "test_malloc.py::TuneMallocTests::test_big_buffers_are_reused_instead_of_faulted_in_again": "a subprocess",
    "test_floor.py": "the emulator in a subprocess",
    "test_sim.py::CommandLineTests": "the emulator's command in a subprocess",
    "test_sinks.py::MP4SinkTests": "ffmpeg",
    "test_sinks.py::PipelineTests": "ffmpeg",
    "test_video.py::RealCaptureTests": "ffmpeg",
    "test_video.py::EmulatorMediaTests": "ffmpeg",
    "test_video.py::UnconvertibleTests": "ffmpeg",
    "test_video.py::GatewayRunTests": "twistd, ffmpeg",
    "test_web_media.py::PlayTests": "ffmpeg",
    "test_web_media.py::PosterTests": "ffmpeg",
    "test_web_media.py::StoredFileTests": "ffmpeg (the emulator's media)",
    "test_video.py::RandomContentTests::test_without_ffmpeg_one_warning_then_random_content":
        "the emulator in a subprocess",
    # In-process, but more than about a second.
    "test_held_steps.py::HeldStepsTests::test_random_schedules": "many random schedules",
    "test_held_steps.py::HeldStepsTests::test_random_schedules_with_a_store_that_refuses_finished_files":
        "many random schedules",
    "test_integration.py::FaultTests::test_tiny_segments": "a transfer in one-byte pieces over loopback",
    "test_integration.py::HostileInputTests::test_garbage_beside_a_good_camera": "over a second",
    "test_hardening.py::HardeningTests::test_idle_and_step_timeouts": "real timeouts",
    "test_hardening.py::HardeningTests::test_min_free_bytes_refuses_new_files_keeps_resumes": "over a second",
    "test_chains.py::RetryTests::test_each_dead_letter_goes_back_to_its_sink_only": "retries on real time",
    "test_chains.py::NameTests": "four sinks over loopback, over a second",
    "test_sinks.py::RestartTests": "a gateway restarted between delivery attempts",
    "test_sinks.py::HTTPFaultTests": "real HTTP faults and their retries",
    "test_sinks.py::SinkWordsTests::test_a_program_that_fails": "a program killed at its timeout",
    "test_fuzz.py::SessionFuzzTests": "hypothesis runs of whole sessions",
    "test_status_after_start.py": "a video given up on real time",
    "test_status_api.py::ApiTests::test_routes_while_cameras_send": "cameras sending while the routes are read",
    "test_metrics.py::MetricsTests": "cameras sending while the metrics are read",
    "test_logs.py::ProgressTests": "progress events on real time",
    "test_slow_reads.py::LoopbackTests": "slow cameras on real time",
    "test_history.py::RedisHistoryTests": "redis-server",
    "test_history.py::SharedRedisApiTests": "redis-server, two gateways",
    "test_history.py::WorkersHistoryTests": "twistd with worker processes",
    "test_history.py::HistoryApiTests::test_the_mp4_and_poster_are_listed_under_the_video": "ffmpeg",
    "test_history.py::HistoryApiTests::test_cameras_online_while_connected_and_their_last_position":
        "a slow camera on real time",
}


def _slow_entry(nodeid: str) -> str | None:
    """The entry of :data:`SLOW` that names the test ``nodeid`` (``tests/file::Class::test``), or None."""
    name = nodeid.split("/")[-1]
    for entry in SLOW:
        if name == entry or name.startswith(entry + "::"):
            return entry
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the tests of :data:`SLOW` ``slow`` (before ``-m`` selects by it)."""
    modules: dict[str, object] = {}
    for item in items:
        module = item.getparent(pytest.Module)
        if module is not None:
            modules[module.nodeid.split("/")[-1]] = module.obj
        if _slow_entry(item.nodeid) is not None:
            item.add_marker(pytest.mark.slow)
    stale = []
    for entry in SLOW:
        file, *names = entry.split("::")
        if file not in modules:
            continue
        found: object = modules[file]
        for name in names:
            found = getattr(found, name, None)
        if found is None:
            stale.append(entry)
    if stale:
        raise pytest.UsageError(f"tests/conftest.py: SLOW names tests that do not exist: {', '.join(stale)}")


@pytest.fixture(autouse=True, scope="session")
def _work_in_temp_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    previous = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("work"))
    yield
    os.chdir(previous)
