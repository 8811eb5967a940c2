"""The one exception type for bad user input: the CLI prints its message on one line and exits 2."""


class UserError(Exception):
    """Bad input from the user (a path, an option, a file's content). The message names the
    culprit and the fix; the CLI shows it without a traceback and exits with `exit_code`."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
