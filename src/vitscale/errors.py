"""Errors a user can cause. The CLI prints them as one line and exits non-zero."""


class UserError(Exception):
    """Base class: the message names the problem and the fix."""


class ConfigError(UserError):
    """A bad config key, value or combination."""


class CheckpointError(UserError):
    """A missing, corrupt or mismatched checkpoint."""


class DataError(UserError):
    """A missing path, unreadable image or unusable dataset."""
