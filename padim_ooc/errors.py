"""The one exception type a user sees: a clear sentence, no traceback."""


class PadimError(Exception):
    """A user-facing error: what was wrong, what was expected, how to fix it.

    The command line prints ``str(err)`` on one line of stderr and exits with a
    non-zero code. Library callers can catch it like any exception.
    """
