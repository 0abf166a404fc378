"""Writing a large output file past the page cache (O_DIRECT), for files of gigabytes written once.

A buffered write copies every byte into page-cache pages the kernel must first find and zero; on a virtual
machine whose host reclaims freed guest memory (balloon, free page reporting) each fresh page also faults on the
host. Measured on the 2-core VM of BENCHMARKS.md: writing 3.4 GB buffered took 10-13 s of system time, with
O_DIRECT 0.6-1.2 s (the rest is the disk, during which the merging threads go on). The bytes go through one
page-aligned staging buffer, written in whole multiples of the block size at aligned offsets; the tail is written
after O_DIRECT is switched off. Where O_DIRECT is not available (macOS, tmpfs, some network filesystems) or
`LLMFAST_DIRECT_WRITE=0`, it is a plain buffered file. The cost: the file is not in the page cache afterwards, so
the first read of it comes from the disk.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
from pathlib import Path
from typing import BinaryIO

ALIGN = 4096  # covers every logical block size in use (512 and 4096)
BUFFER = 16 * 2**20  # bytes per write: large enough that the disk streams, small enough to stay in cache


class DirectFile:
    """A write-only file taking bytes-like objects, written with O_DIRECT in aligned pieces."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        self._buffer = mmap.mmap(-1, BUFFER)  # anonymous mappings are page-aligned
        self._view = memoryview(self._buffer)
        self._fill = 0
        self._direct = True
        self._failed = False  # a write failed: close() only closes (the buffer's bytes are not all unwritten)

    def write(self, data: "bytes | bytearray | memoryview") -> int:
        mv = memoryview(data).cast("B")
        size = len(mv)
        while len(mv):
            take = min(len(mv), BUFFER - self._fill)
            self._view[self._fill: self._fill + take] = mv[:take]
            self._fill += take
            mv = mv[take:]
            if self._fill == BUFFER:
                self._write_out(self._view[:BUFFER])
                self._fill = 0
        return size

    def _write_out(self, view: memoryview) -> None:
        try:
            while len(view):
                try:
                    done = os.write(self._fd, view)
                except OSError as e:
                    if e.errno != errno.EINVAL or not self._direct:
                        raise
                    self._buffered()  # a filesystem that took the flag at open but refuses the writes
                    continue
                view = view[done:]
        except BaseException:
            self._failed = True
            raise
        finally:
            view.release()  # no slice of the staging buffer may outlive the call (it would block closing it)

    def _buffered(self) -> None:
        flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
        self._direct = False

    def close(self) -> None:
        if self._fd < 0:
            return
        try:
            if not self._failed:  # after a failed write the file is incomplete anyway: keep that error
                whole = self._fill - self._fill % ALIGN
                self._write_out(self._view[:whole])
                if whole < self._fill:  # the tail is not a whole block: written through the page cache
                    if self._direct:
                        self._buffered()
                    self._write_out(self._view[whole: self._fill])
            self._fill = 0
        finally:
            os.close(self._fd)
            self._fd = -1
            self._view.release()
            self._buffer.close()

    def __enter__(self) -> "DirectFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_for_writing(path: Path) -> "DirectFile | BinaryIO":
    """`path` opened for a large sequential write: O_DIRECT where the system and the filesystem take it."""
    if os.environ.get("LLMFAST_DIRECT_WRITE", "1") != "0" and hasattr(os, "O_DIRECT"):
        try:
            return DirectFile(path)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
    return open(path, "wb")
