"""pytest set-up: trial's mktemp() writes under the working directory, so run there."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _work_in_temp_dir(tmp_path_factory: pytest.TempPathFactory) -> object:
    previous = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("work"))
    yield
    os.chdir(previous)


@pytest.fixture(autouse=True)
def _unfreeze_the_collector() -> object:
    """A gateway started in this process freezes what exists (GatewayService.startService):
    undone after each test, so that what the test leaves behind can still be collected."""
    yield
    import gc

    gc.unfreeze()
