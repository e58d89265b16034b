"""The one exception type users see: a message that names the thing at fault and says what to do."""


class SdloraError(Exception):
    """A user-facing error. `str(err)` is one line: what is wrong, then what to do about it."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem}; {fix}")
