"""The CLI's failures: one class per exit status, each shown as one line or one JSON object."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Final

import msgspec

from core.errors import DomainError, InvalidInput
from core.ports import BackendError
from hero_deployer.cli.output import colour_on, paint
from hero_deployer.cli.secret_input import UsageError
from hero_deployer.cli.validation import readable

# Exit statuses by class, sysexits(3)-like; stable: scripts branch on them (README, `--help`).
EXIT_OK: Final = 0
EXIT_ERROR: Final = 1  # anything else: a conflict, a state that forbids it, a failed step, a bug
EXIT_USAGE: Final = 2  # the command line is wrong (argparse's own status)
EXIT_INVALID_INPUT: Final = 65  # EX_DATAERR: the service refused a value (InvalidInput)
EXIT_NOT_FOUND: Final = 66  # EX_NOINPUT: no such VM or user, or not with this secret
EXIT_UNAVAILABLE: Final = 69  # EX_UNAVAILABLE: no service, no answer in time, a part is down
EXIT_UNAUTHORIZED: Final = 77  # EX_NOPERM: the token is missing or wrong

EXIT_BY_CODE: Final[dict[str, int]] = {
    "Usage": EXIT_USAGE,
    "InvalidInput": EXIT_INVALID_INPUT,
    "NotFound": EXIT_NOT_FOUND,
    "Unavailable": EXIT_UNAVAILABLE,
    "Unauthorized": EXIT_UNAUTHORIZED,
}

EXIT_STATUS_HELP: Final = f"""\
exit status:
  {EXIT_OK:<3} done
  {EXIT_ERROR:<3} other errors (Conflict, InvalidState, Internal, a step that failed, cancelled)
  {EXIT_USAGE:<3} usage: a wrong or missing flag, no secret given, no --yes without a terminal
  {EXIT_INVALID_INPUT:<3} invalid input: the service refused a value (InvalidInput)
  {EXIT_NOT_FOUND:<3} not found: no such VM or user, or not with this secret (NotFound)
  {EXIT_UNAVAILABLE:<3} unavailable: no service at the URL, no answer in time (Unavailable)
  {EXIT_UNAUTHORIZED:<3} unauthorized: no token, or a wrong one (Unauthorized)
With --json an error is one JSON object on stderr: {{"error": {{"code": ..., "message": ...}}}}"""


class NoService(Exception):
    """Nothing answers as NATS at the resolved URL; the message says where and what to run."""


class NoToken(Exception):
    """No bearer token was configured or found; the message says where the CLI looked."""


class CommandFailed(Exception):
    """The command ran, but what it waited for failed; the message says what (exit status 1)."""


class Cancelled(Exception):
    """The user answered no to a confirmation: nothing was done (exit status 1)."""


@dataclass(frozen=True, slots=True)
class Failure:
    """What the CLI says about an error: its class (a contract code or the CLI's) and message."""

    code: str
    message: str
    coded: bool = False  # the text line names the code ("error: NotFound: vm not found")

    @property
    def exit_status(self) -> int:
        return EXIT_BY_CODE.get(self.code, EXIT_ERROR)


def failure_of(error: BaseException) -> Failure | None:
    """The failure an exception means to a CLI user; None for one the CLI does not expect."""
    match error:
        case InvalidInput():
            return Failure(error.code, readable(error.message), coded=True)
        case DomainError():
            return Failure(error.code, error.message, coded=True)
        case NoService():
            return Failure("Unavailable", str(error))
        case NoToken():
            return Failure("Unauthorized", str(error))
        case UsageError():
            return Failure("Usage", str(error))
        case CommandFailed():
            return Failure("Failed", str(error))
        case Cancelled():
            return Failure("Cancelled", str(error))
        case BackendError():
            return Failure("Error", error.message)
        case TimeoutError():
            return Failure("Timeout", "gave up waiting (--wait-timeout)")
        case OSError() | ValueError():
            return Failure("Error", str(error))
    return None


def report(failure: Failure, *, as_json: bool) -> int:
    """Writes the failure to stderr (one line, or one JSON object); returns its exit status."""
    if as_json:
        body = {"error": {"code": failure.code, "message": failure.message}}
        sys.stderr.write(msgspec.json.encode(body).decode() + "\n")
    else:
        text = f"{failure.code}: {failure.message}" if failure.coded else failure.message
        prefix = paint("error:", "red", on=colour_on(sys.stderr))
        sys.stderr.write(f"{prefix} {text}\n")
    sys.stderr.flush()
    return failure.exit_status
