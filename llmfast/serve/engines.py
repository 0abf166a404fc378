"""Offline engines with the same per-request metrics: vLLM's engine, and Hugging Face transformers.

Both get every request at time 0 and report, per request, the time of its first token, the gaps between
tokens and its finish time, so `metrics.compute_metrics` summarises them exactly like the online benchmark.
The transformers engine is the baseline every report compares vLLM with, and the fallback for variants vLLM
cannot load here (bitsandbytes 4-bit on a CPU, for one); its batches are static: a batch ends when its
longest request ends, which is what plain `model.generate` users get.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from llmfast.serve.loadgen import Request
from llmfast.serve.metrics import RequestResult


def run_vllm_offline(model: Path, requests: list[Request], ignore_eos: bool = True, lora: Path | None = None,
                     dtype: str | None = None, max_model_len: int | None = None,
                     engine_args: dict[str, Any] | None = None) -> tuple[list[RequestResult], float]:
    """Generate with vLLM's engine (LLM), stepping it ourselves to time every request's tokens."""
    from llmfast.serve.machine import detect, vllm_defaults

    env, flags = vllm_defaults(detect())
    for k, v in env.items():
        os.environ.setdefault(k, v)  # read by the engine process it spawns
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest
    from vllm.sampling_params import RequestOutputKind

    kwargs: dict[str, Any] = {"model": str(model), "dtype": dtype or flags[1], "seed": 0}
    if max_model_len:
        kwargs["max_model_len"] = max_model_len
    lora_req = None
    if lora is not None:
        from llmfast.serve.server import check_lora, max_lora_rank

        adapter = check_lora("lora", lora, base=model)
        kwargs.update(enable_lora=True, max_lora_rank=max_lora_rank([adapter]), max_loras=1)
        lora_req = LoRARequest("lora", 1, str(adapter.path))
    kwargs.update(engine_args or {})
    llm = LLM(**kwargs)
    engine = llm.llm_engine
    # A warm-up request, so one-off compilation and allocation do not land on the first measured request.
    llm.generate([{"prompt_token_ids": requests[0].prompt_ids or [1]}],
                 SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
    results = {str(i): RequestResult(prompt_len=r.prompt_len) for i, r in enumerate(requests)}
    seen = {k: 0 for k in results}
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
            res = results[out.request_id]
            n = len(out.outputs[0].token_ids)
            if n > seen[out.request_id]:
                if seen[out.request_id] == 0:
                    res.ttft = now - t0
                else:
                    res.itl.append(now - last[out.request_id])
                last[out.request_id] = now
                seen[out.request_id] = n
            if out.finished:
                res.output_tokens = n
                res.generated_text = out.outputs[0].text
                res.latency = now - t0
                res.success = n > 0
                if not res.success:
                    res.error = "no tokens generated"
    duration = time.perf_counter() - t0
    return [results[str(i)] for i in range(len(requests))], duration


def run_hf(model: Any, tokenizer: Any, requests: list[Request], batch_size: int = 8,
           ignore_eos: bool = True) -> tuple[list[RequestResult], float]:
    """Greedy `generate` in static batches of `batch_size`, in request order, timing every decode step."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StepClock(StoppingCriteria):
        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kw: Any) -> torch.Tensor:
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    results: list[RequestResult] = []
    t0 = time.perf_counter()
    for start in range(0, len(requests), batch_size):
        batch = requests[start : start + batch_size]
        ids = [r.prompt_ids or tokenizer.encode(r.prompt, add_special_tokens=False) for r in batch]
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])  # left padding for generation
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        n_new = max(r.output_len for r in batch)
        clock = StepClock()
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=n_new,
                                 min_new_tokens=n_new if ignore_eos else 0, do_sample=False, pad_token_id=pad,
                                 stopping_criteria=StoppingCriteriaList([clock]))
        new = out[:, width:].tolist()
        for r, toks in zip(batch, new):
            n = min(r.output_len, len(toks))
            if not ignore_eos and eos is not None and eos in toks[:n]:
                n = toks.index(eos) + 1
            times = clock.times[:n]
            res = RequestResult(success=n > 0, prompt_len=len(r.prompt_ids or []) or r.prompt_len,
                                output_tokens=n, start_time=t0)
            if n:
                res.ttft = times[0] - t0
                res.itl = [b - a for a, b in zip(times, times[1:])]
                res.latency = times[-1] - t0
                res.generated_text = tokenizer.decode(toks[:n], skip_special_tokens=True)
            else:
                res.error = "no tokens generated"
            results.append(res)
    return results, time.perf_counter() - t0
