"""User-facing errors: one line that says what is wrong and what to do."""


class QCompileError(Exception):
    """An error caused by the user's input. The CLI prints ``str(err)`` as one line and exits 2."""

    def __init__(self, message: str):
        message = " ".join(str(message).split())
        super().__init__(message)
