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


def test_a_failed_allocation_is_one_line_saying_how_much_it_asked_for():
    """Real allocations beyond any machine's address space (whatever the kernel's overcommit setting): numpy's
    MemoryError, torch's CPU allocator RuntimeError and Python's bare MemoryError each become the CLI's one line, with
    the size in binary units where the error gives it (s46: they were tracebacks)."""
    import numpy as np
    import torch

    from llmfast.errors import as_user_error

    said = []
    for allocate in (lambda: np.empty(2**50), lambda: torch.empty(2**50), lambda: bytearray(2**50)):
        try:
            allocate()
        except Exception as e:  # noqa: BLE001 - each library's own kind
            said.append(str(as_user_error(e)))
    # numpy words its size itself; torch's bytes are 2**52 = 4 PiB; a bare MemoryError says nothing of a size
    assert said == [f"out of memory: an allocation{size} failed: lower the sizes asked for (batch size, lengths, "
                    "ranks, tokens) or free memory, and run again" for size in (" of 8.00 PiB", " of 4.0 PiB", "")]
    assert as_user_error(RuntimeError("expected scalar type Float")) is None  # any other error stays a bug
    # CUDA's (no GPU here: the class torch raises there, with the first words of its message)
    cuda = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of "
                                  "79.19 GiB of which 3.12 GiB is free.")
    assert str(as_user_error(cuda)).startswith("out of GPU memory: an allocation of 20.00 GiB failed: ")


def test_a_lora_rank_beyond_memory_is_refused_in_one_line_and_writes_nothing(tmp_path, tiny_dir):
    import json

    from conftest import run_cli

    rows = [{"messages": [{"role": "user", "content": "Repeat: a"}, {"role": "assistant", "content": "a"}]}] * 4
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "ft.yaml").write_text(f"model: {tiny_dir}\ndata: {{train: {tmp_path / 'train.jsonl'}}}\n"
                                      f"lora: {{r: 2147483647}}\ntrain: {{steps: 1}}\noutput: {tmp_path / 'run'}\n")
    code, _, err = run_cli("finetune", str(tmp_path / "ft.yaml"))
    assert code == 2 and "Traceback" not in err
    # r x hidden (128) float32 entries: 1024 GiB (r is at most 2**31 - 1: larger ranks overflow torch's sizes)
    assert err.strip().splitlines()[-1] == ("llmfast: error: out of memory: an allocation of 1024.0 GiB failed: lower "
                                            "the sizes asked for (batch size, lengths, ranks, tokens) or free memory, "
                                            "and run again")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft.yaml", "train.jsonl"]
