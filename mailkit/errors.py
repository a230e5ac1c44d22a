"""Exceptions that say what the caller should do next."""


class MailError(Exception):
    """A mail server or message problem."""


class TemporaryMailError(MailError):
    """Worth retrying later: 4xx replies, timeouts, refused connections."""


class PermanentMailError(MailError):
    """Retrying cannot help: 5xx replies, rejected login, malformed message."""


class AuthenticationFailed(PermanentMailError):
    """The server rejected the account's credentials."""


class FailNow(Exception):
    """A task error that retrying cannot fix (unknown account, tenant mismatch)."""
