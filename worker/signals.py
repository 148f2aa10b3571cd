"""Process lifetime: a child that must not outlive its parent."""

from __future__ import annotations

import os
import signal


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Linux: ask the kernel to send `signum` to this process when its parent dies, even by SIGKILL
    (`PR_SET_PDEATHSIG`); elsewhere nothing."""
    if hasattr(os, "sched_getaffinity"):  # Linux
        import ctypes

        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signum)  # PR_SET_PDEATHSIG
        except OSError:
            pass
