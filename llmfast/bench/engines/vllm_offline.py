"""vLLM's engine (`vllm.LLM`) in this process, stepped by us so every request's tokens are timed."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from llmfast.bench.engines.base import ENGINES, OfflineEngine, Variant

if TYPE_CHECKING:
    from llmfast.bench.metrics import RequestResult
    from llmfast.bench.workload import Request


class VllmOfflineEngine(OfflineEngine):
    name = "vllm-offline"
    family = "vllm"

    def generate(self, variant: Variant, requests: list["Request"], *, dtype: str, batch_size: int,
                 ignore_eos: bool, max_model_len: int | None = None,
                 engine_args: dict[str, Any] | None = None) -> tuple[list["RequestResult"], float]:
        """Every request added at time 0; vLLM schedules its own batches (`batch_size` does not apply)."""
        from llmfast.bench.logs import send_vllm_logs_to_stderr
        from llmfast.bench.metrics import RequestResult
        from llmfast.serve.lora import max_lora_rank
        from llmfast.serve.machine import detect, vllm_defaults

        env, _ = vllm_defaults(detect())
        for k, v in env.items():
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
        llm = LLM(**kwargs)
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


ENGINES.add("vllm-offline", VllmOfflineEngine())
