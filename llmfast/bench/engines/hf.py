"""The transformers engine: greedy `generate` in static batches, timing every decode step.

It is the baseline every report compares vLLM with, and the engine for variants vLLM cannot load here
(bitsandbytes 4-bit on a CPU, for one). Its batches are static: a batch ends when its longest request ends,
which is what plain `model.generate` users get.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from llmfast.bench.engines.base import ENGINES, OfflineEngine, Variant

if TYPE_CHECKING:
    from llmfast.bench.metrics import RequestResult
    from llmfast.bench.workload import Request


def run_hf(model: Any, tokenizer: Any, requests: list["Request"], batch_size: int = 8,
           ignore_eos: bool = True) -> tuple[list["RequestResult"], float]:
    """Greedy `generate` in static batches of `batch_size`, in request order, timing every decode step.

    A batch's requests are sent when it starts (when the previous batch has finished, as a load generator limited
    to `batch_size` requests in flight sends the next one): TTFT and E2EL count from there, as for vLLM's rows."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    from llmfast.bench.metrics import RequestResult

    class StepClock(StoppingCriteria):
        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kw: Any) -> torch.Tensor:
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # where `generate` stops a request: generation_config's ids (Llama 3 lists its end-of-turn token there beside
    # eos_token's id), as vLLM stops; after the stop come pad tokens, which are not output
    stops = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stops = {*(stops if isinstance(stops, list) else [stops]), tokenizer.eos_token_id} - {None}
    def inputs(batch: list["Request"]) -> tuple[list[list[int]], int, torch.Tensor, torch.Tensor]:
        # a text prompt is encoded as vLLM encodes one (a completion): with the tokenizer's BOS, where it adds one
        ids = [r.prompt_ids or tokenizer.encode(r.prompt) for r in batch]
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])  # left padding for generation
        return ids, width, input_ids, torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])

    if requests:  # untimed, as vLLM's engines are warmed up: the first batch's shapes (prefill and two decode
        # steps), so one-off costs (kernel selection, first allocations) are not the first measured batch's
        _, _, input_ids, mask = inputs(requests[:batch_size])
        with torch.inference_mode():
            model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=2, min_new_tokens=2,
                           do_sample=False, pad_token_id=pad)
    results: list[RequestResult] = []
    t0 = time.perf_counter()
    for start in range(0, len(requests), batch_size):
        batch = requests[start : start + batch_size]
        sent = time.perf_counter()  # tokenizing counts, as in a served request
        ids, width, input_ids, mask = inputs(batch)
        n_new = max(r.output_len for r in batch)
        clock = StepClock()
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=n_new,
                                 min_new_tokens=n_new if ignore_eos else 0, do_sample=False, pad_token_id=pad,
                                 stopping_criteria=StoppingCriteriaList([clock]))
        new = out[:, width:].tolist()
        for r, prompt, toks in zip(batch, ids, new):
            n = min(r.output_len, len(toks))
            if not ignore_eos:
                n = next((i + 1 for i, t in enumerate(toks[:n]) if t in stops), n)
            times = clock.times[:n]
            res = RequestResult(success=n > 0, prompt_len=len(prompt), output_tokens=n, start_time=sent)
            if n:
                res.ttft = times[0] - sent
                res.itl = [b - a for a, b in zip(times, times[1:])]
                res.latency = times[-1] - sent
                res.generated_text = tokenizer.decode(toks[:n], skip_special_tokens=True)
            else:
                res.error = "no tokens generated"
            results.append(res)
    return results, time.perf_counter() - t0


class HfEngine(OfflineEngine):
    name = "hf"
    family = "hf"

    def generate(self, variant: Variant, requests: list["Request"], *, dtype: str, batch_size: int,
                 ignore_eos: bool) -> tuple[list["RequestResult"], float]:
        from llmfast.models import load_model, load_tokenizer

        model = load_model(variant.model_dir, dtype, adapter=variant.lora.path if variant.lora else None,
                           quantization=variant.quantization)
        return run_hf(model, load_tokenizer(variant.model_dir), requests, batch_size, ignore_eos)


ENGINES.add("hf", HfEngine())
