"""Errors the hypervisor raises at the operator's plane (the Control service's status codes)."""

from __future__ import annotations

from typing import Literal

CommandErrorCode = Literal[
    "invalid_argument", "failed_precondition", "resource_exhausted", "not_found"
]


class HostCommandError(ValueError):
    """An operator command the host refuses; it changed no state.

    ``code`` is the gRPC status the Control servicer answers with, so the mapping
    lives with the reason rather than in the adapter.
    """

    def __init__(
        self, field: str, message: str, code: CommandErrorCode = "invalid_argument"
    ) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.code: CommandErrorCode = code
