"""Bench engines are chosen by their registered names (`bench offline --engine`, a bench recipe's `engine:`), and the
sparsifiers `sparsify --help` lists come from their registry."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO
from test_extension_docs import llmfast, one_line, with_example


def test_engine_words_come_from_the_registry():
    """`vllm` is the server's name and lends its word to the in-process vLLM engine on bench offline, which bench
    run refuses (it measures vLLM served)."""
    from llmfast.bench.engine_names import offline_engine, offline_words, run_engine_word, run_words
    from llmfast.bench.engines import ENGINES
    from llmfast.errors import UserError

    assert offline_words() == ["hf", "hf-sparse", "vllm"]
    assert offline_engine("vllm") == offline_engine("vllm-offline") == ("vllm", ENGINES.get("vllm-offline"))
    assert offline_engine("hf-sparse") == ("hf-sparse", ENGINES.get("hf-sparse"))
    assert run_words() == ["auto", "hf", "hf-sparse", "vllm"]
    with pytest.raises(UserError, match=r"^--engine vlm: unknown engine \(did you mean 'vllm'\?\); choose from hf, "):
        offline_engine("vlm")
    with pytest.raises(ValueError, match="for `llmfast bench offline` only"):
        run_engine_word("vllm-offline")


def test_listing_engines_and_methods_imports_no_heavy_library():
    """Every command line builds the whole parser: the engines' names cost no vLLM or torch import, and the
    sparsifiers (pydantic schemas) are imported only when `sparsify --help` is shown."""
    code = ("import sys; from llmfast.cli import build_parser; build_parser(); "
            "print([m for m in ('vllm', 'torch', 'transformers', 'llmfast.sparse') if m in sys.modules])")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.stdout.strip() == "[]", p.stderr[-2000:]


def test_an_engine_registered_as_the_docs_say_is_chosen_by_its_name(tmp_path, tiny_dir):
    """docs/bench.md's hf-serial, added as one file: bench offline and a bench recipe take it by name (bench run
    measured `hf` in its place: the runner looked engines up by family), misspelt it is one line."""
    root = with_example("bench", tmp_path / "pkg")
    assert "hf-serial" in llmfast(root, "bench", "offline", "--help").stdout
    out = tmp_path / "offline.json"
    p = llmfast(root, "bench", "offline", str(tiny_dir), "--engine", "hf-serial", "--num-prompts", "2",
                "--random-input-len", "8", "--random-output-len", "3", "--ignore-eos", "--output", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["engine"] == "hf-serial" and r["completed"] == 2 and r["total_output_tokens"] == 6
    assert "Offline (hf-serial) Benchmark Result" in p.stdout
    one_line(llmfast(root, "bench", "offline", str(tiny_dir), "--engine", "hf-seral"), "did you mean 'hf-serial'?")

    recipe = tmp_path / "bench.yaml"
    recipe.write_text(f"variants:\n  - name: serial\n    model: {tiny_dir}\n    engine: hf-serial\n"
                      "workload: {num_prompts: 2, input_len: 8, output_len: 3, max_concurrency: [2]}\n"
                      f"baseline: none\noutput: {tmp_path / 'report'}\n")
    p = llmfast(root, "bench", "run", str(recipe))
    assert p.returncode == 0, p.stderr[-3000:]
    (variant,) = json.loads((tmp_path / "report" / "results.json").read_text())["variants"]
    assert variant["engine"] == "hf-serial" and variant["points"][0]["completed"] == 2
    assert "| serial | hf-serial |" in (tmp_path / "report" / "report.md").read_text()
    typo = tmp_path / "typo.yaml"
    typo.write_text(recipe.read_text().replace("engine: hf-serial", "engine: hf-seriel"))
    one_line(llmfast(root, "bench", "run", str(typo)),
             f"{typo}:4: variants.0.engine: unknown bench engine (did you mean 'hf-serial'?); choose from auto, hf, "
             "hf-serial, hf-sparse, vllm (got 'hf-seriel')")
    one_line(llmfast(root, "bench", "run", str(recipe), "--set", "variants.0.engine=vllm-offline"),
             "an engine in this process, for `llmfast bench offline` only")


def test_sparsify_help_lists_a_method_registered_as_the_docs_say(tmp_path):
    root = with_example("sparsify", tmp_path / "pkg")
    text = " ".join(llmfast(root, "sparsify", "--help").stdout.split())
    assert "teal_down (Liu et al. 2024, Training-Free Activation Sparsity" in text
    assert "relufy (Mirzadeh et al. 2023" in text and "it trains: --resume continues it" in text
