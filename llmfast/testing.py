"""Tiny real models for tests and device scripts: Llama architecture, a trained BPE tokenizer, random weights.

vLLM's CPU attention kernels refuse small head sizes (16 was refused, 64 works), so head_dim stays 64 and
the model is made small through the hidden size, the layer count and the vocabulary instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# The built-in model's template (ChatML), so chat formatting and loss masking behave the same on both.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_tokenizer(texts: list[str], vocab_size: int = 1024) -> Any:
    """A byte-level BPE tokenizer (GPT-2 style, like SmolLM2's) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<|endoftext|>", bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<|im_end|>")
    fast.chat_template = CHATML_TEMPLATE
    return fast


def _default_corpus() -> list[str]:
    from llmfast.data.tasks import TASKS, generate

    corpus = []
    text = Path(__file__).resolve().parent.parent / "eval" / "text" / "persuasion.txt"
    if text.is_file():
        corpus.append(text.read_text(encoding="utf-8")[:200_000])
    for name in TASKS:
        for row in generate(name, 300, seed=99):
            corpus.extend(m["content"] for m in row["messages"])
    return corpus


def llama_config(hidden_size: int = 128, num_layers: int = 2, num_heads: int = 2, num_kv_heads: int = 1,
                 intermediate_size: int = 256, vocab_size: int = 1024, head_dim: int = 64, tie_word_embeddings: bool = True,
                 **extra: Any) -> Any:
    """The Llama config of these models (tied embeddings unless told, 2048 positions); `extra` goes to LlamaConfig."""
    from transformers import LlamaConfig

    if hidden_size != num_heads * head_dim:
        raise ValueError(f"hidden_size must be num_heads * head_dim (got {hidden_size}, {num_heads} x {head_dim})")
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        head_dim=head_dim, max_position_embeddings=2048, tie_word_embeddings=tie_word_embeddings, **extra,
    )


def build_tiny_llama(
    out_dir: str | Path,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    intermediate_size: int = 256,
    vocab_size: int = 1024,
    seed: int = 0,
    dtype: str = "float32",
    head_dim: int = 64,
    model_vocab_size: int | None = None,
    tie_word_embeddings: bool = True,
) -> Path:
    """Write a random-weight Llama with a real tokenizer to `out_dir` (a normal Hugging Face directory).

    `model_vocab_size` gives the embedding and head a real model's vocabulary (say 151,936) while the
    tokenizer, trained on a small corpus, uses the first `vocab_size` ids: real shapes without a real tokenizer.
    """
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    tokenizer = train_tokenizer(_default_corpus(), vocab_size=vocab_size)
    config = llama_config(
        hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size,
        vocab_size=max(len(tokenizer), model_vocab_size or 0), head_dim=head_dim, tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id)
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
