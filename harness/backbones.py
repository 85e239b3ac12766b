"""Moved to :mod:`harness.toolkit.backbones`; this name keeps plugins written against the first API working."""

import warnings as _warnings

from harness.toolkit.backbones import *  # noqa: F401,F403

_warnings.warn("harness.backbones moved to harness.toolkit.backbones; import it from there", DeprecationWarning, stacklevel=2)
