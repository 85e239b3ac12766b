"""Moved to :mod:`harness.toolkit.pseudo_validation`; this name keeps plugins written against the first API working."""

import warnings as _warnings

from harness.toolkit.pseudo_validation import *  # noqa: F401,F403

_warnings.warn("harness.pseudo_validation moved to harness.toolkit.pseudo_validation; import it from there", DeprecationWarning, stacklevel=2)
