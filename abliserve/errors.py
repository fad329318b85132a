"""The base class of every error a user can cause and fix (bad input, missing files, a
direction for another model). The CLI prints these as one line; anything else is a bug and
keeps its traceback."""


class UserError(Exception):
    """An error whose message tells the user what to change."""
