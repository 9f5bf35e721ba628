"""The `hero-deployer` command: run the service, and talk to a running one.

`main` parses the command line (`main.py`); each module adds the commands it runs: `run.py`
(up, serve, web, rebuild), `service.py` (status, health, events, backend check), `vms.py`,
`users.py`. `errors.py` maps every failure to one exit status and one line (or JSON object).
"""

from hero_deployer.cli.errors import (
    EXIT_BY_CODE,
    EXIT_ERROR,
    EXIT_INVALID_INPUT,
    EXIT_NOT_FOUND,
    EXIT_UNAUTHORIZED,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
)
from hero_deployer.cli.main import main
from hero_deployer.cli.run import client_credentials

__all__ = [
    "EXIT_BY_CODE",
    "EXIT_ERROR",
    "EXIT_INVALID_INPUT",
    "EXIT_NOT_FOUND",
    "EXIT_UNAUTHORIZED",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "client_credentials",
    "main",
]
