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
    from llmfast.data.text import shipped_file
    from llmfast.errors import UserError

    book = "eval/text/persuasion.txt"
    text = shipped_file(book)
    if text is None:  # without it the tokenizer, and so every tiny model, silently differed from the checkout's
        raise UserError(f"{book} is missing from llmfast's package data: reinstall llmfast "
                        "(pip install --force-reinstall --no-deps llmfast)")
    corpus = [text.read_text(encoding="utf-8")[:200_000]]
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


# Tokenizers shipped the way other families ship theirs, for checking that nothing assumes SmolLM2's: a BOS the
# tokenizer adds AND a template that writes it, no pad token, an end-of-turn token that is not `eos_token`, a
# template that raises. One vocabulary (every family's special tokens) so one tiny model serves them all.
FAMILY_TOKENS = SPECIAL_TOKENS + ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                  "<|eot_id|>", "<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"]
LLAMA3_TEMPLATE = (  # Meta-Llama-3-8B-Instruct's
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA_TEMPLATE = (  # gemma-2-2b-it's
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
# family: (bos_token, eos_token, pad_token, the tokenizer adds BOS, template, generation_config's eos ids)
FAMILIES: dict[str, tuple[str | None, str, str | None, bool, str, list[str]]] = {
    # Meta-Llama-3-8B-Instruct as first released: eos_token <|end_of_text|>, turns end with <|eot_id|>
    "llama3": ("<|begin_of_text|>", "<|end_of_text|>", None, True, LLAMA3_TEMPLATE, ["<|end_of_text|>", "<|eot_id|>"]),
    "gemma": ("<bos>", "<eos>", "<pad>", True, GEMMA_TEMPLATE, ["<eos>", "<end_of_turn>"]),
    "chatml": ("<|im_start|>", "<|im_end|>", "<|im_end|>", False, CHATML_TEMPLATE, ["<|im_end|>"]),
}


def family_tokenizer(family: str, bpe: Any = None) -> Any:
    """A PreTrainedTokenizerFast shipped as `family` ships its own (FAMILIES), on `bpe` (a `tokenizers.Tokenizer` of
    FAMILY_TOKENS' vocabulary; by default one trained on the tiny models' corpus)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if bpe is None:
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=FAMILY_TOKENS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        bpe.train_from_iterator(_default_corpus(), trainer=trainer)
    bos, eos, pad, adds_bos, template, _ = FAMILIES[family]
    tok = Tokenizer.from_str(bpe.to_str())  # a copy: the post-processor is this family's
    # as Llama 3's and Gemma's tokenizer.json do: every encode with add_special_tokens (the default) starts with it
    tok.post_processor = None if not adds_bos else processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad)
    fast.chat_template = template
    return fast


def build_family_model(out_dir: str | Path, family: str, like: str | Path | None = None) -> Path:
    """A tiny Llama with `family`'s tokenizer and its ids in config.json and generation_config.json; `like`: a model
    this function made (for any family), whose weights, of the same vocabulary, are linked rather than made again."""
    import json
    import os

    from tokenizers import Tokenizer

    out = Path(out_dir)
    if like is None:
        tokenizer = family_tokenizer(family)
        build_tiny_llama(out, vocab_size=len(tokenizer))  # its own trained tokenizer is replaced below
    else:
        out.mkdir(parents=True)
        os.link(Path(like) / "model.safetensors", out / "model.safetensors")
        (out / "config.json").write_bytes((Path(like) / "config.json").read_bytes())
        tokenizer = family_tokenizer(family, Tokenizer.from_file(str(Path(like) / "tokenizer.json")))
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        (out / f).unlink(missing_ok=True)
    tokenizer.save_pretrained(out)
    bos, eos, pad, _, _, stops = FAMILIES[family]
    ids = {k: tokenizer.convert_tokens_to_ids(t) if t else None for k, t in (("bos", bos), ("eos", eos), ("pad", pad))}
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    config.update(bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    gen = {"bos_token_id": ids["bos"], "eos_token_id": [tokenizer.convert_tokens_to_ids(t) for t in stops]}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2), encoding="utf-8")
    return out


def script_greedy(model_dir: str | Path, steps: dict[int, int]) -> None:
    """Rewrite a tiny Llama's weights so that greedy decoding follows `steps` (token id -> next id) from the last
    token alone, and picks id 0 after any other: a real model whose output, stops included, is known in advance.
    Attention and MLP add nothing (zero output projections); each scripted token's embedding is a one-hot on a
    dimension of its own, and an untied head maps that dimension to its next token."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = torch.zeros_like(model.model.embed_tokens.weight)
        head = torch.zeros_like(emb)
        for dim, (token, following) in enumerate(steps.items()):
            emb[token, dim] = 1.0
            head[following, dim] = 1.0
        model.model.embed_tokens.weight = torch.nn.Parameter(emb)
        model.lm_head.weight = torch.nn.Parameter(head)
    model.config.tie_word_embeddings = False
    model.save_pretrained(model_dir, safe_serialization=True)


# What a verb imports (about 4 s a process on 2 cores): run_forked's `preload` for jobs that run verbs.
VERB_IMPORTS = ["torch", "transformers", "transformers.modeling_utils", "peft", "llmfast.cli", "llmfast.models"]

# The interpreter of `run_forked`: imports `preload` once, then runs each job in a child forked from it, one after
# another (a job sees what the jobs before it wrote to disk, and none of their process state), as `python -m MODULE
# ARGS` or `python -c CODE` would; its stdin, stdout and stderr files of its own, the exit status recorded.
_FORKER = r'''
import importlib, json, os, runpy, sys

with open(sys.argv[1]) as f:
    spec = json.load(f)
for name in spec["preload"]:
    importlib.import_module(name)
job, codes = None, []
for each in spec["jobs"]:
    sys.stdout.flush(), sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        job = each
        break
    codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
if job is None:
    with open(spec["codes"], "w") as f:
        json.dump(codes, f)
    sys.exit(0)
del spec, codes, each
for fd, path, mode in ((0, job["stdin"], os.O_RDONLY), (1, job["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                       (2, job["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
    opened = os.open(path, mode)
    os.dup2(opened, fd)
    os.close(opened)
del f, fd, path, mode, opened
os.environ.update(job["env"])
if job.get("module"):
    sys.argv = [job["module"], *job["argv"]]
    sys.modules.pop(job["module"], None)  # as under -m: the module runs as __main__, not as the preloaded copy
    runpy.run_module(job["module"], run_name="__main__", alter_sys=True)
else:
    sys.argv = ["-c", *job["argv"]]
    exec(compile(job["code"], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
'''


def run_forked(jobs: list[dict[str, Any]], preload: list[str], folder: str | Path, env: dict[str, str] | None = None,
               cwd: str | Path | None = None, timeout: float = 900) -> list[tuple[int, str, str]]:
    """Run `jobs` one after another, each in a process of its own forked from one interpreter that imported
    `preload` (say VERB_IMPORTS) once; (exit status, stdout, stderr) of each.
    A job is {"module": "llmfast.cli", "argv": [...]} (`python -m`) or {"code": "..."} (`python -c`), with optional
    "env" (set in its process only) and "stdin" (text). `folder` holds the jobs' files; `env` and `cwd` are the
    interpreter's. For tests whose subject is what one command does in a process, not the start of a process."""
    import json
    import os
    import signal
    import subprocess
    import sys

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    specs = []
    for i, job in enumerate(jobs):
        (folder / f"job{i}.in").write_text(job.get("stdin", ""), encoding="utf-8")
        specs.append({"module": job.get("module"), "argv": list(job.get("argv", [])), "code": job.get("code"),
                      "env": dict(job.get("env", {})), **{k: str(folder / f"job{i}.{k[3:]}")
                                                          for k in ("stdin", "stdout", "stderr")}})
    spec = folder / "jobs.json"
    spec.write_text(json.dumps({"preload": preload, "jobs": specs, "codes": str(folder / "codes.json")}))
    # a session of its own: past `timeout`, the job running then goes with the interpreter
    p = subprocess.Popen([sys.executable, "-c", _FORKER, str(spec)], env=env, cwd=cwd, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        raise
    if p.returncode != 0:
        raise RuntimeError(f"run_forked's interpreter failed ({p.returncode}): {err[-3000:]}")
    codes = json.loads((folder / "codes.json").read_text())
    return [(code, Path(s["stdout"]).read_text(), Path(s["stderr"]).read_text()) for code, s in zip(codes, specs)]
