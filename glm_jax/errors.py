"""The one error family for mistakes in what a user hands us.

A bad config value, checkpoint, data file, prompt or flag raises an `InputError` (a ValueError)
whose message names the culprit: the field, the file and tensor, the line. The launcher prints
these as one line and exits with status 2; anything else is a bug and keeps its traceback.
"""


class InputError(ValueError):
    """Something the user supplied is wrong; the message says what and where."""


class ConfigError(InputError):
    """A config field holds an invalid value."""


class CheckpointError(InputError):
    """A checkpoint is unreadable or does not match the model its config.json describes."""
