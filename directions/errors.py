"""Errors of the directions pipeline that a user causes (bad options, unusable prompt sets)."""

from abliserve.errors import UserError


class DirectionError(UserError, ValueError):
    """An option or input the pipeline cannot work with; the message names the fix."""
