"""Domain errors raised by services; the web and API layers turn them into HTTP answers."""

from __future__ import annotations

from dataclasses import dataclass, field


def encodable(text: str) -> str:
    """`text` with any lone surrogate written as its escape (\\udXXX): an error that quotes the
    input it refuses must itself be sendable as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class ServiceError(Exception):
    status_code = 400

    def __init__(self, message: str) -> None:
        message = encodable(message)
        super().__init__(message)
        self.message = message


class NotFound(ServiceError):
    status_code = 404


class PermissionDenied(ServiceError):
    status_code = 403


class Conflict(ServiceError):
    status_code = 409


class PayloadTooLarge(ServiceError):
    status_code = 413


class UnsupportedMediaType(ServiceError):
    status_code = 415


@dataclass
class FieldError:
    """One problem in one record of an upload: where (line, field) and what."""

    line: int | None
    field: str | None
    message: str

    def as_dict(self) -> dict[str, object]:
        field = None if self.field is None else encodable(self.field)
        return {"line": self.line, "field": field, "message": encodable(self.message)}


@dataclass
class InvalidInput(ServiceError):
    message: str
    errors: list[FieldError] = field(default_factory=list)
    status_code: int = 422

    def __post_init__(self) -> None:
        super().__init__(self.message)  # sets self.message, made encodable
