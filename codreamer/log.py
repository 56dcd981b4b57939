"""Loguru set-up: one concise line per event, with the run id and iteration in context.

Stages log through `logger`; the loop binds `run_id` and `iteration` with
`logger.contextualize(...)`, so every line of an iteration says where it belongs, and a
copy of the log at DEBUG level goes to the run directory.
"""

from __future__ import annotations

import sys
from pathlib import Path

from loguru import logger

CONSOLE_FORMAT = (
    "<green>{time:HH:mm:ss}</green> <level>{level: <7}</level> "
    "<cyan>{extra[run_id]}</cyan>{extra[iteration_tag]} {message}"
)
FILE_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <7} | {extra[run_id]}{extra[iteration_tag]} | {name}:{line} | {message}"


def _add_iteration_tag(record: dict) -> None:
    iteration = record["extra"].get("iteration")
    record["extra"]["iteration_tag"] = f" it{iteration}" if iteration is not None else ""


def configure_logging(level: str = "INFO", log_file: Path | None = None) -> None:
    """Replace loguru's default sink with ours; idempotent."""
    logger.remove()
    logger.configure(extra={"run_id": "-"}, patcher=_add_iteration_tag)
    logger.add(sys.stderr, level=level, format=CONSOLE_FORMAT, colorize=sys.stderr.isatty())
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        logger.add(log_file, level="DEBUG", format=FILE_FORMAT, enqueue=False)
