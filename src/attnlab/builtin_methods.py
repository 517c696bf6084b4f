"""Deprecated: the built-in methods are :mod:`attnlab.methods.builtin` (this name works
for one release and warns)."""
import warnings

from attnlab.methods.builtin import *  # noqa: F401,F403

warnings.warn("attnlab.builtin_methods is deprecated; use attnlab.methods.builtin", DeprecationWarning, stacklevel=2)
