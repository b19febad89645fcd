"""The one exception type for mistakes a user can cause (bad params, unreadable input, a failed gate)."""


class CxrError(Exception):
    """A problem the user can fix. The message names the file or key and what to do; the CLI prints it in one line."""


class StoreUnavailable(CxrError):
    """The tracking store or model registry did not answer (a locked database, an HTTP 5xx, no connection), even
    after retries. Not the user's mistake: the CLI prints it in one line, the Prefect flow retries the stage."""
