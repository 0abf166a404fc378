#!/usr/bin/env python
"""GPU training memory of llmfast vs plain HF + PEFT, estimated on a CPU by counting the tensors of a step.

No GPU is needed: every training step of one pass of each side (forward, backward, with the AdamW states
already held) runs on PyTorch's meta device, which has real shapes and dtypes but no data and does no arithmetic. The
code is the real code of both sides: `attach_lora` + packed batch + chunked loss (`llmfast finetune`), and
scripts/bench_finetune.py's plain HF + PEFT set-up and padded batch (`prepare_model_for_kbit_training` for
QLoRA); bitsandbytes 4-bit layers run through bitsandbytes' own autograd function and shape functions.
A dispatch mode counts every storage the step allocates, rounded up to 512 bytes as CUDA's caching
allocator rounds, and releases it when Python frees it. The peak is what `torch.cuda.max_memory_allocated`
reports for a step (weights, adapters, optimizer states, gradients, activations, temporaries); it leaves
out the CUDA context, kernel workspaces, the optimizer's own temporaries (tens of MiB at these sizes) and
what an operator allocates and frees inside itself (flash attention's backward with grouped KV heads
expands dK/dV for a moment: about 0.1 GiB per layer at the 1.5B shape).

Three things the meta device cannot do are answered from the host, as the real run would answer them:
- transformers asks whether the attention mask is all ones and whether position ids restart (packing):
  answered from the host copy of the batch;
- SDPA picks a kernel by the rules CUDA uses: flash attention for 16-bit inputs without a mask (grouped
  KV heads included), memory-efficient attention with a mask or in float32, the math kernel (which keeps
  the full attention matrix) for float32 grouped-query attention without a mask (transformers passes
  `enable_gqa` only when there is no mask);
- llmfast's paged 8-bit AdamW keeps its states outside PyTorch's allocator on a GPU; here both sides hold
  32-bit AdamW states (conservative for ours).

Calibrated against plain HF + PEFT peaks measured on an H200 (docs/environment.md); `--calibrate`
prints them side by side. The same pass also counts matmul and attention FLOPs (torch's FlopCounterMode):
their ratio is what each side computes, not a speed (elementwise work, kernel efficiency and launch
overheads are not in it).

    python scripts/estimate_finetune_memory.py                # the issue's shapes: table + JSON
    python scripts/estimate_finetune_memory.py --calibrate    # also the H200-measured anchors
    python scripts/estimate_finetune_memory.py --data mix     # varied lengths: what packing saves
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common  # noqa: E402
import bench_finetune as bench  # noqa: E402  (the plain HF + PEFT side and the model shapes)

from llmfast.allocations import AllocationCounter  # noqa: E402
from llmfast.data.chat import Encoded  # noqa: E402
from llmfast.data.packing import pack  # noqa: E402

CUDA_BLOCK = 512  # the caching allocator rounds every allocation up to this

# Plain HF + PEFT, r=16 all-linear, bf16, batch 8 x 1024, peaks measured on an H200 (docs/environment.md),
# with gradient checkpointing as that file states it (for the QLoRA run it does not say).
H200_MEASURED = [
    ("smollm2", None, "off", 13.4), ("smollm2", None, "on", 5.2),
    ("llama-1.5b", None, "on", 17.8), ("llama-1.5b", "nf4", "not stated", 67.5),
]


def _sdpa_as_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                  dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                  enable_gqa: bool = False) -> torch.Tensor:
    """scaled_dot_product_attention through the kernel CUDA would pick for these inputs."""
    sixteen_bit = q.dtype in (torch.float16, torch.bfloat16)
    if attn_mask is None and sixteen_bit:
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, scale=scale)[0]
    if enable_gqa and k.shape[1] != q.shape[1]:
        return torch.ops.aten._scaled_dot_product_attention_math(q, k, v, attn_mask, dropout_p, is_causal,
                                                                 scale=scale, enable_gqa=True)[0]
    if attn_mask is not None and attn_mask.dtype == torch.bool:  # what SDPA does with a boolean mask
        attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~attn_mask, -math.inf)
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, attn_mask, q.requires_grad, dropout_p,
                                                                  is_causal, scale=scale)[0]


@contextlib.contextmanager
def answered_from_host(attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None) -> Iterator[None]:
    """Answer transformers' data-dependent mask questions from the host copy of the batch; SDPA as on CUDA."""
    import transformers.masking_utils as mu

    find_packed = mu.find_packed_sequence_indices
    host_packed = find_packed(position_ids) if position_ids is not None else None
    saved = (mu.fast_all, mu.find_packed_sequence_indices, F.scaled_dot_product_attention)
    all_ones = attention_mask is None or bool(attention_mask.all())
    mu.fast_all = lambda t: all_ones
    mu.find_packed_sequence_indices = lambda pos: (
        None if host_packed is None else torch.empty(host_packed.shape, dtype=host_packed.dtype, device=pos.device))
    F.scaled_dot_product_attention = _sdpa_as_cuda
    try:
        yield
    finally:
        mu.fast_all, mu.find_packed_sequence_indices, F.scaled_dot_product_attention = saved


def _count_4bit_matmuls() -> None:
    """bitsandbytes' fused 4-bit matmul is its own op, unknown to torch's FLOP counter: 2 x M x N x K."""
    import bitsandbytes  # noqa: F401  (defines the op)
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.bitsandbytes.gemm_4bit, get_raw=True)
    def _(a: torch.Tensor, b: torch.Tensor, shape_b: list[int], *args: Any, out_val: Any = None, **kwargs: Any) -> int:
        return 2 * (a.numel() // a.shape[-1]) * shape_b[0] * shape_b[1]


def meta_model(shape: str, quantization: str | None, quant_storage: torch.dtype) -> Any:
    """The random-weight model of bench_finetune's shape, bf16, on the meta device; 4-bit as transformers
    loads it with a BitsAndBytesConfig (every Linear but the head, double quantization)."""
    import bitsandbytes as bnb
    from transformers import LlamaForCausalLM

    from llmfast.testing import llama_config

    shape_kw = dict(bench.SHAPES[shape])
    vocab = shape_kw.pop("model_vocab_size", 4096)
    config = llama_config(**shape_kw, vocab_size=vocab, use_cache=False)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    if quantization:
        for layer in model.model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name, linear in list(parent.named_children()):
                    if not isinstance(linear, torch.nn.Linear):
                        continue
                    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False,
                                          compute_dtype=torch.bfloat16, compress_statistics=True,
                                          quant_type=quantization, quant_storage=quant_storage, device="meta")
                    data, state = bnb.functional.quantize_4bit(linear.weight.data, quant_type=quantization,
                                                               compress_statistics=True, quant_storage=quant_storage)
                    q.weight = bnb.nn.Params4bit(data, requires_grad=False, quant_state=state, bnb_quantized=True,
                                                 module=q, quant_type=quantization, quant_storage=quant_storage)
                    q.quant_state = state
                    setattr(parent, name, q)
        model.is_loaded_in_4bit = True
    return model


def make_examples(kind: str, n: int, max_length: int) -> list[Encoded]:
    """bench_finetune's data (`long` or `mix`), encoded with the tokenizer its random-weight models get."""
    import tempfile

    from llmfast.data.chat import read_examples
    from llmfast.testing import _default_corpus, train_tokenizer

    tokenizer = train_tokenizer(_default_corpus(), vocab_size=4096)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.jsonl"
        bench.make_data(path, n, kind=kind, max_length=max_length)
        examples = read_examples(path, tokenizer, max_length).examples
    return examples


def estimate(side: str, shape: str, quantization: str | None, gradient_checkpointing: bool,
             examples: list[Encoded], batch_size: int, length: int, loss_chunk_size: int | None = None) -> dict:
    """One pass over `examples` by `side` ("ours" or "baseline"), batched as each side batches them: peak GiB
    of any step, what every step holds (weights, adapters, AdamW states), and matmul/attention TFLOPs."""
    import random

    from torch.utils.flop_counter import FlopCounterMode

    from llmfast.finetune.trainer import micro_batches

    # the batches as each side builds them, on the host (not counted): (tensors, mask, position ids, targets)
    if side == "ours":
        host = []
        for b in micro_batches(pack(examples, length), batch_size, seed=0, epoch=0, pad_id=0):
            t = b.tensors("cpu")
            host.append((t, None, t["position_ids"], b.target_tokens))
    else:
        order = list(range(len(examples)))
        random.Random(0).shuffle(order)  # as bench_finetune's plain loop
        chunks = [[examples[i] for i in order[s:s + batch_size]] for s in range(0, len(order), batch_size)]
        host = [(t, t["attention_mask"], None, 1) for t in (bench.baseline_batch(c, 0, "cpu") for c in chunks)]
    counter = AllocationCounter(block=CUDA_BLOCK)
    with counter:
        if side == "ours":
            from llmfast.finetune.lora import attach_lora
            from llmfast.finetune.trainer import _LossModule
            from llmfast.quant import parse_quantization
            from llmfast.recipe import FinetuneRecipe, LoraConfig, TrainConfig

            # load_base: the compute dtype for everything that is not 4-bit, and as the 4-bit storage dtype
            model = meta_model(shape, quantization, torch.bfloat16)
            recipe = FinetuneRecipe.model_construct(
                lora=LoraConfig(r=16, alpha=32, target_modules="all-linear"),
                quantization=parse_quantization(quantization),
                train=TrainConfig(gradient_checkpointing=gradient_checkpointing))
            step = _LossModule(attach_lora(model, recipe), chunk_size=loss_chunk_size or TrainConfig().loss_chunk_size)
            step.train()
        else:
            step = bench.baseline_prepare(meta_model(shape, quantization, torch.uint8), quantization,
                                          gradient_checkpointing)
        steps = [({k: v.to("meta") for k, v in t.items()}, mask, positions, targets)
                 for t, mask, positions, targets in host]
        trainable = [p for p in step.parameters() if p.requires_grad]
        states = _hold_adamw_states(step)  # as after the first optimizer step
        counter.peak = counter.current  # loading transients are not part of a step
        held = counter.current

        def one_pass() -> None:
            for inputs, mask, positions, targets in steps:
                with answered_from_host(mask, positions):
                    # the plain loop keeps only `.loss` of the output, so its 16-bit logits die before backward
                    loss = step(**inputs) if side == "ours" else step(**inputs).loss
                    (loss / targets).backward()
                del loss
                for p in trainable:
                    p.grad = None

        one_pass()
        peak = counter.peak
    with FlopCounterMode(display=False) as flops:  # a second pass: its module hooks keep tensors alive
        one_pass()
    del states
    return {"peak_gib": round(peak / 2**30, 2), "held_gib": round(held / 2**30, 2),
            "tflop": round(flops.get_total_flops() / 1e12, 2), "steps": len(steps),
            "tokens": sum(len(e) for e in examples), "trainable": sum(p.numel() for p in trainable)}


def _hold_adamw_states(model: Any) -> list[torch.Tensor]:
    return [torch.zeros_like(p, dtype=torch.float32) for p in model.parameters() if p.requires_grad for _ in (0, 1)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", action="append", choices=list(bench.SHAPES), help="default: smollm2 and llama-1.5b")
    ap.add_argument("--quantization", action="append", choices=["none", "nf4", "fp4"], help="default: none and nf4")
    ap.add_argument("--no-gradient-checkpointing", action="store_true", help="both sides without it")
    ap.add_argument("--data", default="long", choices=["long", "mix"], help="bench_finetune's data kinds")
    ap.add_argument("--examples", type=int, help="default: one batch of long examples, 64 mixed ones")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--loss-chunk-size", type=int, help="llmfast's train.loss_chunk_size (default: the recipe default)")
    ap.add_argument("--calibrate", action="store_true", help="also estimate the H200-measured plain HF anchors")
    bench_common.add_output_args(ap, "runs/bench/finetune_memory_estimate.json")
    args = ap.parse_args()
    bench_common.check_output(args.json, args.force)
    gc = not args.no_gradient_checkpointing
    _count_4bit_matmuls()
    examples = make_examples(args.data, args.examples or (args.batch_size if args.data == "long" else 64),
                             args.max_length)
    rows = []
    print(f"estimated CUDA peak of a training step and matmul/attention TFLOPs of one pass: {len(examples)} "
          f"{args.data} examples ({sum(len(e) for e in examples)} tokens), batch {args.batch_size}, max length "
          f"{args.max_length}, bf16, LoRA r=16 all-linear, gradient checkpointing {'on' if gc else 'off'}")
    print(f"{'shape':<12}{'method':<7}{'llmfast GiB':>12}{'HF+PEFT GiB':>13}{'ratio':>7}"
          f"{'llmfast TFLOP':>15}{'HF TFLOP':>10}{'HF/ours':>9}")
    for shape in args.shape or ["smollm2", "llama-1.5b"]:
        for q in args.quantization or ["none", "nf4"]:
            quant = None if q == "none" else q
            ours = estimate("ours", shape, quant, gc, examples, args.batch_size, args.max_length, args.loss_chunk_size)
            base = estimate("baseline", shape, quant, gc, examples, args.batch_size, args.max_length)
            ratio = round(ours["peak_gib"] / base["peak_gib"], 2)
            work = round(base["tflop"] / ours["tflop"], 2)
            rows.append({"shape": shape, "quantization": quant, "gradient_checkpointing": gc, "ours": ours,
                         "baseline": base, "peak_ratio": ratio, "flop_ratio_baseline_over_ours": work})
            print(f"{shape:<12}{q if quant else 'lora':<7}{ours['peak_gib']:>12.2f}{base['peak_gib']:>13.2f}{ratio:>7}"
                  f"{ours['tflop']:>15.1f}{base['tflop']:>10.1f}{work:>9}")
    calibration = []
    if args.calibrate:
        long8 = examples if args.data == "long" and len(examples) == 8 else make_examples("long", 8, 1024)
        print("\ncalibration: plain HF + PEFT, batch 8 x 1024, estimated here vs measured on an H200")
        print(f"{'shape':<12}{'method':<7}{'est. no ckpt':>13}{'est. ckpt':>11}{'H200':>7}  checkpointing")
        for shape, quant, stated, measured in H200_MEASURED:
            off, on = (estimate("baseline", shape, quant, ckpt, long8, 8, 1024)["peak_gib"] for ckpt in (False, True))
            calibration.append({"shape": shape, "quantization": quant, "estimate_no_checkpointing_gib": off,
                                "estimate_checkpointing_gib": on, "h200_measured_gib": measured,
                                "h200_checkpointing": stated})
            print(f"{shape:<12}{quant or 'lora':<7}{off:>13.2f}{on:>11.2f}{measured:>7.1f}  {stated}")
    # Counts, not timings: no load check; provenance says which torch/transformers/peft gave them.
    bench_common.write_json(args.json, {"date": time.strftime("%Y-%m-%d"), "kind": "estimate (meta device)",
                                        "data": args.data, "examples": len(examples), "batch_size": args.batch_size,
                                        "max_length": args.max_length, "rows": rows, "calibration": calibration},
                            args.force, None)
    print(f"results: {args.json}")


if __name__ == "__main__":
    main()
