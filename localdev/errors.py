"""The local tooling's errors (the CLI turns each into one line and an exit code: localdev/failures.py)."""

from shared.errors import TokenRefreshError


class OperatorError(TokenRefreshError, RuntimeError):
    """The command could not (or would not) do what was asked. The CLI prints it and exits 1."""


class UsageError(TokenRefreshError, ValueError):
    """The command line must change (e.g. --tenant is needed). The CLI prints usage and exits 2."""


class ServiceError(OperatorError):
    """A service the command needs failed: `what` failed, `where` (host:port, the setting that names it) and the
    `fix`, in one line. Never a secret: callers pass host:port and setting names, and scrubbed reasons only."""

    def __init__(self, what: str, where: str, fix: str):
        self.what, self.where, self.fix = what, where, fix
        super().__init__(f"{what} ({where}); {fix}")


class BrokerUnavailableError(OperatorError):
    """RabbitMQ cannot be reached (or did not come back in time): the local host stops; the CLI prints
    the one-line message and exits 1, without a traceback."""
