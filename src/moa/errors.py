"""Errors a user can fix. The CLI prints them as one line `moa: error: ...` and exits 2."""


class MoAError(Exception):
    """A user mistake (bad input, missing file, unknown domain, ...). Message is shown as is."""


class DataError(MoAError):
    """A problem with a training/eval data file; the message names FILE:LINE."""
