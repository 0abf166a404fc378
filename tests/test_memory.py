"""Peak memory as every verb reports it: this process's high-water mark, and a process tree's summed RSS (bench
watches vLLM's engine, a grandchild)."""

from pathlib import Path


def test_peak_memory_is_the_kernels_high_water_mark_in_gib():
    """ru_maxrss is in KiB on Linux: the figure every verb reports is /proc's VmHWM (kB) over 2**20."""
    import numpy as np

    from llmfast.memory import peak_memory_gib

    def hwm() -> int:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1])

    np.ones(64 * 2**20 // 8)  # 64 MiB touched: the mark is this process's, whatever ran before
    before = hwm()
    got = peak_memory_gib()
    after = hwm()
    # above: the mark can only have grown; below, with room for a larger image this process was exec'd from (its
    # mark carries over into ru_maxrss): a figure in MiB would be 1024 times this
    assert before / 2**20 <= got <= 2 * after / 2**20


def test_peak_rss_sums_the_whole_process_tree(tmp_path):
    """vLLM's engine runs in a grandchild of the process bench watches: PeakRss sums every descendant's resident
    memory (read here from /proc, not psutil), not only the children's."""
    import os
    import subprocess
    import sys
    import time

    from llmfast.memory import PeakRss

    ready = tmp_path / "ready"
    grandchild = (f"import pathlib, time; b = b'x' * (300 * 2**20); pathlib.Path({str(ready)!r}).write_text('1'); "
                  "time.sleep(600)")
    child = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys; subprocess.run([sys.executable, '-c', "
                                                    f"{grandchild!r}])"])
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert child.poll() is None and time.monotonic() < deadline, "the grandchild did not start"
            time.sleep(0.05)

        def rss(pid: int) -> int:
            line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmRSS:"))
            return int(line.split()[1]) * 1024

        watch = PeakRss()  # this process: the child, and the child's child, under it
        own = rss(os.getpid())
        total = watch.sample()
        assert total >= min(own, rss(os.getpid())) + rss(child.pid) + 300 * 2**20 and watch.peak_bytes == total
    finally:
        import psutil

        for p in psutil.Process(child.pid).children(recursive=True):
            p.kill()
        child.kill()
        child.wait()
