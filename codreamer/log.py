"""Loguru set-up: one concise line per event, with the run id and iteration in context.

Stages log through `logger`; the loop binds `run_id` and `iteration` with
`logger.contextualize(...)`, so every line of an iteration says where it belongs, and a
copy of the log at DEBUG level goes to the run directory. Every sink has loguru's `diagnose`
off (no variable values in tracebacks); the entry points call `configure_logging` first, so
no command prints loguru's default DEBUG output.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from loguru import logger

if TYPE_CHECKING:
    from loguru import Record

CONSOLE_FORMAT = (
    "<green>{time:HH:mm:ss}</green> <level>{level: <7}</level> "
    "<cyan>{extra[run_id]}</cyan>{extra[iteration_tag]} {message}"
)
FILE_FORMAT = (
    "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <7} | {extra[run_id]}{extra[iteration_tag]} | {name}:{line} | {message}"
)


_log_file: Path | None = None  # the run.log the current configuration writes to


def current_log_file() -> Path | None:
    """The file the DEBUG log goes to (a run's `run.log`), or None when there is none."""
    return _log_file


def _add_iteration_tag(record: Record) -> None:
    iteration = record["extra"].get("iteration")
    record["extra"]["iteration_tag"] = f" it{iteration}" if iteration is not None else ""


def configure_logging(level: str = "INFO", log_file: Path | None = None) -> None:
    """Replace loguru's default sink with ours; idempotent."""
    global _log_file
    logger.remove()
    _log_file = log_file
    logger.configure(extra={"run_id": "-"}, patcher=_add_iteration_tag)
    # diagnose=False: loguru's variable dump in tracebacks would print the values of every frame's
    # locals (settings, keys, request bodies), on the console and in run.log alike.
    logger.add(sys.stderr, level=level, format=CONSOLE_FORMAT, colorize=sys.stderr.isatty(), diagnose=False)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        logger.add(log_file, level="DEBUG", format=FILE_FORMAT, enqueue=False, diagnose=False)
