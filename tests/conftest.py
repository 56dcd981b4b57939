"""Shared test set-up: loguru sinks never outlive the test that added them.

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
