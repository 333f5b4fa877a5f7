class VlcapError(Exception):
    """A problem the user can fix. The CLI prints it as one line (no traceback), so the message
    names the file or option at fault and what to do about it."""


def few(items, limit=4):
    """``a, b, c, d and 7 more`` for error messages that name offending keys or files."""
    items = list(items)
    if not items:
        return "none"
    return ", ".join(map(str, items[:limit])) + (f" and {len(items) - limit} more" if len(items) > limit else "")


class VlcapWarning(UserWarning):
    """Something the user should know that does not stop the command (a plugin skipped, a
    checkpoint made with another plugin version). The CLI prints it as one line."""
