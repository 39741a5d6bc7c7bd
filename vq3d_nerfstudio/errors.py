"""Errors every layer may raise: the bottom of the import graph (imports nothing of ours)."""

from __future__ import annotations


class DatasetError(ValueError):
    """A problem with the user's data; the message names the file and the fix."""


class PackageError(ValueError):
    """A model package that is missing, truncated, of another version or does not fit; the message
    names the file and the fix."""
