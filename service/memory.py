"""Giving freed memory back to the system (glibc), so RSS follows what the bridge holds.

Two moments matter. Documents pass through in megabyte strings: glibc's default
raises its mmap threshold after the first such block is freed and from then on
keeps them in the heap, so RSS ratchets up with every document; a fixed
threshold (:func:`return_freed_memory`, once at start) keeps blocks over 128 KiB
in their own mappings, unmapped when freed. And a restore reads every state
record of a partition (and the Kafka client its fetch buffers) before it builds
the entries: that memory is freed afterwards but stays in the heap's free lists;
:func:`trim` hands it back (38,000 states: 1,457 → 1,081 bytes of RSS each).
With another C library both are no-ops.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools

#: glibc's mallopt parameter number for the mmap threshold (malloc.h).
_M_MMAP_THRESHOLD = -3


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc, loaded once (None with another C library)."""
    with contextlib.suppress(OSError):
        return ctypes.CDLL("libc.so.6")
    return None


def return_freed_memory() -> None:
    """Make glibc give large freed blocks back to the system at once (call at start)."""
    libc = _libc()
    with contextlib.suppress(AttributeError):
        if libc is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)


def trim() -> None:
    """Give the heap's free memory back to the system now (after a restore)."""
    libc = _libc()
    with contextlib.suppress(AttributeError):
        if libc is not None:
            libc.malloc_trim(0)
