"""Moved to :mod:`harness.toolkit.coreset`; this name keeps plugins written against the first API working."""

import warnings as _warnings

from harness.toolkit.coreset import *  # noqa: F401,F403

_warnings.warn("harness.coreset moved to harness.toolkit.coreset; import it from there", DeprecationWarning, stacklevel=2)
