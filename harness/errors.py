"""Exceptions the core raises; each message says what is wrong and what to do."""

from __future__ import annotations


class HarnessError(Exception):
    """Base class of every error the harness reports to the user without a traceback."""


class DatasetError(HarnessError):
    """A dataset tree is missing, incomplete or malformed; the message names the file."""


class PluginError(HarnessError):
    """A plugin could not be loaded or declared an invalid spec."""


class WeightsNotFoundError(HarnessError):
    """Pretrained weights are not on disk; the message says where to put them."""



class WeightsVerifyError(HarnessError):
    """A weight file's sha256 differs from the pinned one."""


class MethodOutputError(HarnessError):
    """A method's ``predict`` returned maps or scores that break the contract (NaN, shape)."""


class UsageError(HarnessError):
    """A command-line option has a value the harness cannot use."""


class HarnessWarning(UserWarning):
    """Something the user should know that does not stop the command; shown as one ``warning:`` line."""
