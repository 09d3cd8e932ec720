"""structlog set-up for every memhp process: JSON lines or console, bound context."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog


def configure_logging(
    level: str = "info", *, json: bool = False, stream: TextIO | None = None
) -> None:
    """Route structlog (and stdlib logging) to ``stream`` (stderr by default)."""
    out: TextIO | _CurrentStderr = stream or _CurrentStderr()
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    numeric = getattr(logging, level.upper(), logging.INFO)
    structlog.configure(
        processors=[*shared, structlog.processors.dict_tracebacks, renderer]
        if json
        else [*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(out),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)


class _CurrentStderr:
    """Whatever ``sys.stderr`` is at each write, not what it was when logging was set up:
    a test that captures stderr for a while must not leave later log lines writing to
    its closed buffer."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def _stderr_logger(*args: object) -> structlog.PrintLogger:
    return structlog.PrintLogger(_CurrentStderr())  # type: ignore[arg-type]


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A module logger; quiet (warnings and up, on stderr) until a process configures logging."""
    if not structlog.is_configured():
        structlog.configure(
            wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
            logger_factory=_stderr_logger,
        )
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(name)
    return logger


def logs_at(logger: object, level: int) -> bool:
    """Whether ``logger`` emits events at ``level`` (``logging.DEBUG``, ...).

    structlog's filtering loggers fix their level when bound, so a hot path asks once and
    skips building the keyword arguments of an event that would be dropped. A logger
    that cannot tell is taken to emit everything.
    """
    enabled = getattr(logger, "is_enabled_for", None)
    return enabled is None or bool(enabled(level))
