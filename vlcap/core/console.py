"""Printing what came from files, users and plugins: as text, never as rich markup.

File names, captions, prompt templates, plugin names, paths and error messages may hold ``[/]``
(rich would raise a MarkupError, often after the work is done) or ``[word]`` (rich would drop it),
and anything read from a file may hold terminal control sequences (clear the screen, set the
window title, hide text) or lone surrogates (from file names that are not UTF-8, which a UTF-8
terminal cannot encode). ``safe`` escapes those; ``text`` and ``say`` never parse markup.
Every line vlcap prints with a value in it goes through here.
"""
import re

from rich.text import Text

# C0 controls but tab and newline, DEL, C1 controls, bidirectional overrides and isolates (which
# reorder what a terminal shows), line/paragraph separators, and lone surrogates.
UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def safe(value):
    """``str(value)`` with every control character, bidi override and lone surrogate written as
    a visible escape (``\\x1b``, ``\\u202e``, ``\\udcff``)."""
    return UNSAFE.sub(lambda match: ascii(match.group())[1:-1], str(value))


def text(value, style=None):
    """``value`` as a rich ``Text`` (a table cell, a title): printed as it is, never as markup."""
    return Text(safe(value), style=style or "")


def say(console, message, style=None):
    """Print one ``message`` on the rich ``console`` as text (``style`` for the whole line), without
    markup, highlighting or wrapping inside words."""
    console.print(text(message, style), soft_wrap=True, highlight=False)
