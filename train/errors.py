"""Errors that reach the user as one clear line (``train.main`` prints them without a traceback)."""


class UserError(Exception):
    """A problem with the user's config, data, workdir or checkpoints, stated in one line."""
