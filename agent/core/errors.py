"""User-facing errors: one line saying what is wrong and what to do."""


class IobridgeError(Exception):
    """An error the CLI reports as one clear line (no traceback).

    `hint` says what the user can do about it.
    """

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} ({self.hint})"
        return self.message


class UsageError(IobridgeError):
    """Bad command-line input or configuration."""

    exit_code = 2
