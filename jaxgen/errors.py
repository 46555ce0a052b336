"""The one exception type users see.

Every user-facing failure (a bad config key, a missing file, a malformed JSONL
line) raises `JaxgenError` with a one-line message that names the key, file or
line. The CLI prints that line and exits non-zero; nothing else is caught.
"""


class JaxgenError(Exception):
    """A user error: the message is one line naming what is wrong and where."""
