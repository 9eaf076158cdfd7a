"""The exceptions the CLI turns into one line and an exit code: bad input, and a run stopped
on purpose."""


class UsageError(Exception):
    """Bad input from the user: a config key, a path, a value.

    The CLI prints the message on one line (no traceback) and exits with code 2. The message
    names the file, key or sample at fault and says what to do about it.
    """


class RunStopped(Exception):
    """The run stopped before ``max_steps`` on purpose; the CLI prints it and exits ``exit_code``.

    Args:
        message: one line saying why, and what to do next.
        exit_code: the process's exit status.
    """

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def error_line(error: Exception) -> str:
    """The one line the user sees for ``error``.

    An error raised in a DataLoader worker reaches the main process re-raised with the
    worker's traceback as its message ("Caught UsageError in DataLoader worker process 0.
    Original Traceback ... automodel.errors.UsageError: MESSAGE"); its last line holds the
    original message.
    """
    text = str(error)
    if "\nOriginal Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last
