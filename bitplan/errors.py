"""The one error type a user sees: a message that names the problem and the fix."""


class BitplanError(Exception):
    """A problem with the user's input. The message says what is wrong and what to do.

    The CLI prints it on one line and exits with status 2.
    """
