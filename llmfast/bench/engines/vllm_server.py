"""vLLM's OpenAI server, loaded through the load generator: the engine `bench run` prefers.

One server per model; the LoRA variants of a model share one more, with LoRA enabled, and are served by
name (vLLM's LoRA layers slow every request on a LoRA-enabled server, the base model's too: 54 against 81
output tokens/s for the built-in model on a 2-core CPU, so the base is measured on a server without them).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from llmfast.bench.engines.base import ENGINES, Engine, Variant

if TYPE_CHECKING:
    from llmfast.serve.server import VllmServer


class VllmServerEngine(Engine):
    name = "vllm"
    family = "vllm"

    def server(self, variants: list[Variant], log_path: Path | None = None, timeout: float = 600.0,
               extra_args: list[str] | None = None, parallel: tuple[int, int] = (1, 1)) -> "ServedGroup":
        """A server for variants of one model (all with adapters, or one without), its workers `parallel` (tensor,
        pipeline parallel sizes); start it, and stop it after use."""
        from llmfast.serve.server import ServerSpec, VllmServer

        models = {v.model_dir for v in variants}
        if len(models) != 1:
            raise ValueError(f"one server serves one model, not {sorted(map(str, models))}")
        spec = ServerSpec(model=variants[0].model_dir, served_name="model", port=0,
                          loras=[v.lora for v in variants if v.lora is not None], extra_args=list(extra_args or []),
                          tensor_parallel_size=parallel[0], pipeline_parallel_size=parallel[1])
        return ServedGroup(VllmServer(spec, log_path=log_path), variants, timeout)


class ServedGroup:
    """`with engine.server(variants) as g:` a ready server; `g.served_name(v)` is what requests name."""

    def __init__(self, server: "VllmServer", variants: list[Variant], timeout: float) -> None:
        self.server = server
        self.variants = variants
        self.timeout = timeout

    @property
    def base_url(self) -> str:
        return self.server.base_url

    @property
    def pid(self) -> int:
        assert self.server.proc is not None
        return self.server.proc.pid

    def served_name(self, variant: Variant) -> str:
        return variant.lora.name if variant.lora is not None else self.server.spec.name

    def start(self) -> "ServedGroup":
        """Start and wait until the server serves the model; a failed start is a UserError (server stopped)."""
        self.server.start()
        try:
            self.server.wait_ready(self.timeout)
        except BaseException:
            self.server.stop()
            raise
        return self

    def stop(self) -> None:
        self.server.stop()

    def __enter__(self) -> "ServedGroup":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


ENGINES.add("vllm", VllmServerEngine())
