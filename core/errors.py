"""Domain errors, each carrying the contract's error code and number."""

from __future__ import annotations


class DomainError(Exception):
    """An error the contract names; its message is safe to show to the caller."""

    code = "Internal"
    number = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(DomainError):
    code = "InvalidInput"
    number = 400


class Unauthorized(DomainError):
    code = "Unauthorized"
    number = 401


class NotFound(DomainError):
    code = "NotFound"
    number = 404


class Conflict(DomainError):
    code = "Conflict"
    number = 409


class InvalidState(DomainError):
    code = "InvalidState"
    number = 409


class Unavailable(DomainError):
    code = "Unavailable"
    number = 503


class Internal(DomainError):
    code = "Internal"
    number = 500


class ConcurrencyError(Conflict):
    """An append's expected version did not match the stream's version."""


ERRORS_BY_CODE: dict[str, type[DomainError]] = {
    cls.code: cls
    for cls in (InvalidInput, Unauthorized, NotFound, Conflict, InvalidState, Unavailable, Internal)
}

VM_NOT_FOUND = "vm not found"
USER_NOT_FOUND = "user not found"
