"""The one exception type that means "the user asked for something we cannot do"."""


class UsageError(Exception):
    """Bad input from the user: a config key, a path, a value.

    The CLI prints the message on one line (no traceback) and exits with code 2. The message
    names the file, key or sample at fault and says what to do about it.
    """
