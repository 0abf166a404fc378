"""Large outputs written past the page cache (llmfast/direct_write.py): the same bytes as a plain write for any
sequence of write sizes, aligned or not, and a plain file where asked."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import numpy as np
import pytest

from llmfast import direct_write
from llmfast.direct_write import ALIGN, BUFFER, DirectFile, open_for_writing


@pytest.mark.parametrize("sizes", [
    [8, 1000, 3],  # a file smaller than a block: all of it is the tail
    [ALIGN],  # exactly one block: no tail
    [BUFFER - 5, 10, 3 * BUFFER + 17],  # across the staging buffer's edge, then several buffers in one write
    [BUFFER, BUFFER],  # whole buffers
    [0, 7, 0, ALIGN * 3 - 7],  # empty writes; ends on a block boundary
])
def test_direct_file_writes_the_same_bytes(sizes: list[int], tmp_path: Path) -> None:
    rng = np.random.default_rng(sum(sizes))
    pieces = [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]
    path = tmp_path / "out.bin"
    with open_for_writing(path) as f:
        if isinstance(f, DirectFile):  # this filesystem takes O_DIRECT: the writes bypass the page cache
            assert fcntl.fcntl(f._fd, fcntl.F_GETFL) & os.O_DIRECT
        for piece in pieces:
            assert f.write(piece.data) == piece.size
    assert path.read_bytes() == b"".join(p.tobytes() for p in pieces)


def test_a_closed_file_closes_again_quietly(tmp_path: Path) -> None:
    f = DirectFile(tmp_path / "x.bin")
    f.write(b"abc")
    f.close()
    f.close()
    assert (tmp_path / "x.bin").read_bytes() == b"abc"


def test_plain_file_when_turned_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMFAST_DIRECT_WRITE", "0")
    with open_for_writing(tmp_path / "plain.bin") as f:
        assert not isinstance(f, DirectFile)
        f.write(b"xyz")
    assert (tmp_path / "plain.bin").read_bytes() == b"xyz"


def test_an_existing_file_is_truncated(tmp_path: Path) -> None:
    """The writer only ever opens files inside a fresh temporary directory; truncation is what `wb` did."""
    path = tmp_path / "old.bin"
    path.write_bytes(b"0" * (direct_write.ALIGN * 2 + 5))
    with open_for_writing(path) as f:
        f.write(b"new")
    assert path.read_bytes() == b"new"


def test_a_failing_write_raises_its_own_error_and_writes_nothing_twice(tmp_path: Path) -> None:
    """A file-size limit (what a full disk does to a write) in a child process: the OSError comes out, not a
    BufferError from closing the staging buffer, and close() does not write the buffer again."""
    import subprocess
    import sys

    script = f"""
import errno, resource, signal
from pathlib import Path
from llmfast.direct_write import DirectFile, BUFFER
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (BUFFER + 8192, BUFFER + 8192))
f = DirectFile(Path({str(tmp_path / 'big.bin')!r}))
try:
    try:
        f.write(b"x" * (3 * BUFFER))
    finally:
        f.close()
except OSError as e:
    assert e.errno == errno.EFBIG, e
    print("EFBIG")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "EFBIG", done.stderr[-2000:]
    size = (tmp_path / "big.bin").stat().st_size
    assert size <= BUFFER + 8192  # stopped at the limit; nothing written after the failure
