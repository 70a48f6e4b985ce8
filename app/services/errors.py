"""Domain errors raised by services; the web and API layers turn them into HTTP answers."""

from __future__ import annotations

from dataclasses import dataclass, field


class ServiceError(Exception):
    status_code = 400

    def __init__(self, message: str) -> None:
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
        return {"line": self.line, "field": self.field, "message": self.message}


@dataclass
class InvalidInput(ServiceError):
    message: str
    errors: list[FieldError] = field(default_factory=list)
    status_code: int = 422

    def __post_init__(self) -> None:
        super().__init__(self.message)
