"""The one exception type for mistakes a user can cause (bad params, unreadable input, a failed gate)."""


class CxrError(Exception):
    """A problem the user can fix. The message names the file or key and what to do; the CLI prints it in one line."""
