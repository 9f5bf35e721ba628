"""Domain errors, each carrying the contract's error code and number."""

from __future__ import annotations


class DomainError(Exception):
    """An error the contract names; its message is safe to show to the caller."""

    # a kind's code is its class name, its number given on its class line; a subclass without
    # a number (ConcurrencyError) is reported as its base

    code = "Internal"
    number = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __init_subclass__(cls, number: int | None = None) -> None:
        super().__init_subclass__()
        if number is not None:
            cls.code, cls.number = cls.__name__, number


class InvalidInput(DomainError, number=400): ...


class Unauthorized(DomainError, number=401): ...


class NotFound(DomainError, number=404): ...


class Conflict(DomainError, number=409): ...


class InvalidState(DomainError, number=409): ...


class Unavailable(DomainError, number=503): ...


class Internal(DomainError, number=500): ...


class ConcurrencyError(Conflict):
    """An append's expected version did not match the stream's version."""


ERRORS_BY_CODE: dict[str, type[DomainError]] = {
    cls.code: cls
    for cls in (InvalidInput, Unauthorized, NotFound, Conflict, InvalidState, Unavailable, Internal)
}

VM_NOT_FOUND = "vm not found"
USER_NOT_FOUND = "user not found"
