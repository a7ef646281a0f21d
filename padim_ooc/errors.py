"""The one exception type a user sees: a clear sentence, no traceback."""
import os


class PadimError(Exception):
    """A user-facing error: what was wrong, what was expected, how to fix it.

    The command line prints ``str(err)`` on one line of stderr and exits with a
    non-zero code. Library callers can catch it like any exception.
    """


def os_message(err: OSError) -> str:
    """An I/O error in one line, as the command line prints it: the system's reason and the file."""
    where = f" ({os.fsdecode(err.filename)})" if getattr(err, "filename", None) else ""
    return f"{err.strerror or err}{where}".replace("\n", " ")
