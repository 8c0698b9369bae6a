"""The one exception type for a user's mistake (bad input, missing files, bad parameters).

The CLI turns it into a one-line message and exit code 2; library callers can catch it
as a ``ValueError``.
"""


class CascadeError(ValueError):
    pass
