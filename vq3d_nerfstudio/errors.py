"""Errors every layer may raise: the bottom of the import graph (imports nothing of ours).

Library code raises :class:`Vq3dError` (or a subclass) and never exits; the entry points (the
``vq3d`` subcommands through ``scripts/common.run``, ``vq3d-train-stage2``, and the plugin's own
boundaries inside nerfstudio's commands: the trainer's and the pipeline's) print its one line after
``"<command>: error: "`` and exit with status 1.
"""

from __future__ import annotations


def _rebuild(cls: type, message: str, state: dict) -> "Vq3dError":
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.__dict__.update(state)
    return err


class Vq3dError(Exception):
    """The one family library layers raise; its message is the one line the entry points print
    (naming the file or option and the fix), without the ``"<command>: error: "`` they put before it."""

    def __reduce__(self):
        """Pickled (from a DataLoader worker to the main process) as its class, message and
        attributes, whatever arguments a subclass's ``__init__`` takes."""
        return _rebuild, (type(self), str(self), dict(self.__dict__))


class DatasetError(Vq3dError, ValueError):
    """A problem with the user's data; the message names the file and the fix."""


class PackageError(Vq3dError, ValueError):
    """A model package that is missing, truncated, of another version or does not fit; the message
    names the file and the fix."""
