"""How a `python -m llmfast.cli` process paces its progress bars in a log file and ends, launched alone or as one
worker of torchrun (or accelerate)."""

from __future__ import annotations

import os
import select
import signal
import sys
import time
from typing import Any, NoReturn


def process_group_started() -> bool:
    """Whether a torch.distributed process group is up (one a script calling `main([...])` set up itself)."""
    torch = sys.modules.get("torch")  # a command that never imported torch started no process group
    return bool(torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized())


def end_process_group(callers: bool = False) -> None:
    """Destroy the process group of a launch (finetune over several processes) while Python is whole: left to
    interpreter finalization, gloo's worker threads can release tensors after the GIL is gone and abort the
    process (SIGABRT; pytorch/pytorch#179291, #190489), failing a run that had finished. `callers`: the group was
    up before the command ran (a script's own), and is the script's to end."""
    if not callers and process_group_started():
        sys.modules["torch"].distributed.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """Exit with `code`. A worker of a launch (LOCAL_RANK set) skips interpreter finalization: its gloo group,
    destroyed but still referenced by the sharded model's device mesh (gloo has no shutdown), would be freed there,
    and a worker thread left joinable aborts the finished process ('terminate called without an active exception':
    1 two-process run in 11 under load on these CPUs, ~1 in 200 with the group destroyed, 0 in 80 with this). Its
    outputs are written and closed by then."""
    try:  # the last of stdout, here rather than at finalization, where a closed pipe is unhandled
        flush(sys.stdout, sys.stderr)
    except BrokenPipeError:
        code = pipe_closed() or PIPE_CLOSED
    if "LOCAL_RANK" in os.environ:
        os._exit(code)
    sys.exit(code)


def flush(*streams: Any) -> None:
    """Flush each stream; one closed before the process started (`>&-`, `2>&-`) is None in Python, and skipped."""
    for stream in streams:
        if stream is not None:
            stream.flush()


# tqdm's own settings for a bar written into a file (a CI log, nohup.out, vLLM's server log): a repaint every 30 s,
# not every 0.1 s, and its monitor thread's repaint of an idle bar as rare (every ~15 s with its 10)
LOG_BARS = {"TQDM_MININTERVAL": "30", "TQDM_MAXINTERVAL": "30"}

PIPE_CLOSED = 128 + signal.SIGPIPE  # 141: what a shell reports for a tool that SIGPIPE ended (`yes | head -1`)


def pipe_closed() -> int | None:
    """After a BrokenPipeError: if the reader of stdout (or stderr) went away (`llmfast ... | head -1`), the status to
    end with quietly, as a Unix tool SIGPIPE ends does (Python's "Note on SIGPIPE"); None if neither is closed (a
    socket's or a child's pipe broke: an error of its own). The closed streams are pointed at /dev/null, so nothing
    written later (a progress bar closed at exit, the interpreter's last flush) raises again."""
    closed = False
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        try:
            fd = stream.fileno()
        except (AttributeError, OSError, ValueError):  # replaced by an object with no descriptor (a test's capture)
            continue
        poll = select.poll()
        poll.register(fd, select.POLLOUT)
        # POLLERR on a pipe's write end: its reader closed it. A file or terminal stays as it is, for any later line.
        if any(events & select.POLLERR for _, events in poll.poll(0)):
            os.dup2(devnull, fd)
            closed = True
    os.close(devnull)
    return PIPE_CLOSED if closed else None


class Stopped(KeyboardInterrupt):
    """SIGTERM (`timeout`, Slurm, docker stop) or SIGHUP (a closed terminal) met as Ctrl-C is: every verb's cleanup
    runs (no half artifact, no temporary sibling left), then one line and exit 128 + the signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def raise_interrupt(signum: int, frame: Any) -> None:
    raise Stopped(signum)


def stop_on_signals() -> dict[int, Any]:
    """SIGTERM and SIGHUP raise `Stopped` where they would end the process silently (their default; one ignored,
    as under nohup, stays ignored); returns the handlers replaced, for `restore_signals`."""
    previous: dict[int, Any] = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            if signal.getsignal(sig) == signal.SIG_DFL:
                previous[sig] = signal.signal(sig, raise_interrupt)
        except ValueError:  # not the main thread (main() called from another): left as they are
            pass
    return previous


def restore_signals(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def interrupted_line(e: KeyboardInterrupt) -> str:
    sig = getattr(e, "signum", signal.SIGINT)
    return "llmfast: interrupted" if sig == signal.SIGINT else f"llmfast: stopped by {signal.Signals(sig).name}"


def interrupted_code(e: KeyboardInterrupt) -> int:
    return 128 + int(getattr(e, "signum", signal.SIGINT))


# How long a worker other than process 0 waits, after an error, for the launcher to stop it: process 0 meets the same
# input within moments, says it and fails, and the launcher then stops the others.
PEER_GRACE_S = 10.0


def launch_rank() -> int | None:
    """This process's rank among the workers of a launch of several (torchrun, accelerate launch), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    return int(os.environ.get("RANK", "0"))


def _peer_ended(e: BaseException) -> bool:
    """A collective that failed because another worker of the launch ended (gloo: the connection closed)."""
    while e is not None:
        if any(m in str(e) for m in ("Connection closed by peer", "Connection reset by peer")):
            return True
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return False


def quiet_worker(e: BaseException, user_error: bool) -> bool:
    """Whether this worker of a launch leaves `e` unsaid. Every worker meets the same input and the same stop:
    process 0 says it once; another one repeated the line, or, stopped by the launcher once process 0 had failed,
    added a misleading 'stopped by SIGTERM'. A collective cut short by another worker's end (its own line, or a
    kill the launcher reports) is no error of this one: it printed gloo's traceback (s47). A worker other than 0
    with an error of its own says it if the launcher has not stopped it within PEER_GRACE_S."""
    rank = launch_rank()
    if rank is None:
        return False
    if isinstance(e, KeyboardInterrupt):  # process 0's line, even where the stop cut a collective short
        return rank != 0
    if _peer_ended(e):
        return True
    if rank == 0 or not user_error:
        return False  # a bug keeps its traceback
    try:
        time.sleep(PEER_GRACE_S)
    except KeyboardInterrupt:  # the launcher stopped this worker: process 0 said it
        return True
    return False
