"""The base class of every error a user can cause and fix (bad input, missing files, a
direction for another model). The CLI prints these as one line; anything else is a bug and
keeps its traceback."""


class UserError(Exception):
    """An error whose message tells the user what to change."""


def printable(text: str) -> str:
    """``text`` with control characters escaped (``\\x1b``): a message may quote a file's
    contents or a path, and a terminal must never interpret escape sequences from them."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)
