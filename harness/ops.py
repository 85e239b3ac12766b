"""Moved to :mod:`harness.toolkit.ops`; this name keeps plugins written against the first API working."""

import warnings as _warnings

from harness.toolkit.ops import *  # noqa: F401,F403

_warnings.warn("harness.ops moved to harness.toolkit.ops; import it from there", DeprecationWarning, stacklevel=2)
