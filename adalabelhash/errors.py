"""The one exception type users see as a single `error: ...` line."""


class UserError(Exception):
    """Bad input or configuration: the message names what is wrong and how to fix it.

    The CLI prints it as one line and exits with status 2; anything else is a bug and keeps
    its traceback.
    """
