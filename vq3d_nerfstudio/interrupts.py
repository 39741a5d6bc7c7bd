"""Ctrl-C as a request to stop, for both trainers (stage 1 under ``ns-train``, stage 2): the bottom
layer (imports nothing of ours).

The first Ctrl-C (SIGINT) asks the training loop to finish its current step, save a checkpoint and
stop (resume with the same command); a second one raises ``KeyboardInterrupt`` at once.
"""

from __future__ import annotations

import signal
from typing import Callable, Optional


class StopRequest:
    """A context manager that, while open, turns SIGINT into :attr:`requested`: the first Ctrl-C
    sets it, calls ``on_request`` (e.g. setting nerfstudio's ``Trainer.stop_training``) and says
    ``notice`` through ``say``; a second Ctrl-C raises ``KeyboardInterrupt``. The previous handler is
    restored on exit. Outside the main thread (where Python cannot install a signal handler: a test
    runner's worker thread) it installs nothing and ``requested`` stays False."""

    def __init__(
        self,
        notice: str = "Ctrl-C: finishing this step and saving a checkpoint (press again to stop at once)",
        say: Callable[[str], None] = print,
        on_request: Optional[Callable[[], None]] = None,
    ) -> None:
        self.notice, self.say, self.on_request = notice, say, on_request
        self.requested = False
        self._previous = None

    def __enter__(self) -> "StopRequest":
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.on_request is not None:
            self.on_request()
        self.say(self.notice)

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
