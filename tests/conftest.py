"""Shared test set-up: async tests on asyncio, an opt-in single torch thread, and loguru sinks
that never outlive the test that added them.

Entry points call `configure_logging`, which adds a sink on the `sys.stderr` of that moment:
under pytest that is the test's capture stream, closed when the test ends. A later test that
logs would then print "Logging error in Loguru Handler" into its own captured stderr. After
every test the sinks are replaced by one on the process's real stderr, as loguru's default
handler is, so every test starts as if it ran alone.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest
from loguru import logger


@pytest.fixture(autouse=True)
def _fresh_loguru_sinks() -> Iterator[None]:
    yield
    logger.remove()
    logger.add(sys.__stderr__, level="DEBUG", diagnose=False)  # like loguru's own default handler


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """Every `@pytest.mark.anyio` test runs on asyncio (ART, Weave and aiohttp need it)."""
    return "asyncio"


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """One torch thread for a real-model test (opt in: `pytest.mark.usefixtures`): on a shared
    2-core machine two threads contend and run several times slower (DESIGN.md)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
