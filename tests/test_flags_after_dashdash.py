"""The vLLM flags after `--` that serve's checks judge by (the chat template vLLM renders every chat with, the flags
that choose a model's class) are read as vLLM's own parser reads them (serve/vllm_flags.py): every spelling it takes
(`--chat_template`, `--flag=value`, a flag's unique prefix, `--hf-overrides.key`), a --config YAML, and what it
refuses (an ambiguous prefix). The hand readers they replace missed a prefix, a dotted key and a --config file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from llmfast.errors import UserError

FOO = "NoSuchForCausalLM"  # an architecture neither vLLM nor transformers has
OTHER_TEMPLATE = ("{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}### assistant:{% endif %}")  # not the tiny model's ChatML


def test_the_template_given_in_every_spelling_vllm_takes(tmp_path: Path) -> None:
    from llmfast.serve.stops import given_template

    given = tmp_path / "given.jinja"
    given.write_text("{{ messages }}", encoding="utf-8")
    for extra in (["--chat-template", str(given)], ["--chat_template", str(given)], [f"--chat-template={given}"],
                  ["--max-num-seqs", "2", "--chat-template", str(given)]):
        assert given_template(extra) == "{{ messages }}", extra  # a file: its text
    assert given_template(["--chat-template", "{{ x }}"]) == "{{ x }}"  # the template itself
    config = tmp_path / "vllm.yaml"
    config.write_text(f"chat-template: {given}\nmax-num-seqs: 2\n", encoding="utf-8")
    assert given_template(["--config", str(config)]) == "{{ messages }}"
    assert given_template(["--chat-template-content-format", "string"]) is None  # another flag, not a template
    assert given_template(["--max-num-seqs", "2"]) is None and given_template([]) is None
    # a prefix of --chat-template is one of --chat-template-content-format too: vLLM refuses it at its start
    with pytest.raises(UserError, match=r"^the vLLM flags after --: ambiguous option: --chat-templ could match "
                                        r"--chat-template, --chat-template-content-format"):
        given_template(["--chat-templ", str(given)])


def test_the_flags_that_choose_the_class_in_every_spelling_vllm_takes(tmp_path: Path) -> None:
    from llmfast.serve.vllm_archs import unserved_architecture

    config = tmp_path / "vllm.yaml"
    config.write_text("model-impl: transformers\n", encoding="utf-8")
    llama = json.dumps(["LlamaForCausalLM"])
    for extra in (["--model-impl", "transformers"], ["--model_impl=vllm"], ["--model-im", "transformers"],
                  ["--hf-overrides", json.dumps({"architectures": ["LlamaForCausalLM"]})],
                  ["--hf-overrides.architectures", llama], [f"--hf_overrides.architectures={llama}"],
                  ["--model-class-overrides", json.dumps({FOO: "vllm.model_executor.models.llama:LlamaForCausalLM"})],
                  ["--config", str(config)]):
        assert unserved_architecture({"architectures": [FOO]}, extra) is None, extra  # left to vLLM
    for extra in ([], ["--max-num-seqs", "2"], ["--model-impl", "auto"], ["--hf-overrides={}"],  # vLLM's defaults
                  ["--hf-overrides", json.dumps({"max_position_embeddings": 4096})],  # not the class
                  ["--hf-overrides.rope_scaling", json.dumps({"rope_type": "yarn", "factor": 2.0})]):
        assert unserved_architecture({"architectures": [FOO]}, extra) == FOO, extra


def test_serve_judges_by_the_flags_vllm_reads(tmp_path: Path, tiny_dir: Path) -> None:
    """prepare_spec end to end: a --config file's chat template is the one vLLM renders an adapter's chats with (the
    adapter's own template then no refusal), and a prefix of --model-impl leaves the class to vLLM."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from llmfast.serve.server import prepare_spec

    adapter = tmp_path / "other"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir), LoraConfig(r=2, target_modules=["q_proj"])
                   ).save_pretrained(adapter)
    (adapter / "chat_template.jinja").write_text(OTHER_TEMPLATE, encoding="utf-8")
    with pytest.raises(UserError, match="was trained with another chat template than the served model"):
        prepare_spec(str(tiny_dir), loras=[f"other={adapter}"])
    config = tmp_path / "vllm.yaml"
    config.write_text(f"chat-template: {adapter / 'chat_template.jinja'}\n", encoding="utf-8")
    spec = prepare_spec(str(tiny_dir), loras=[f"other={adapter}"], extra_args=["--config", str(config)])
    assert [a.name for a in spec.loras] == ["other"]

    unknown = tmp_path / "unknown-arch"
    shutil.copytree(tiny_dir, unknown)
    cfg = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**cfg, "architectures": [FOO]}))
    with pytest.raises(UserError, match=f"names the architecture {FOO}, for which this vLLM has no model class"):
        prepare_spec(str(unknown))
    assert prepare_spec(str(unknown), extra_args=["--model-im", "transformers"]).model == unknown


def test_a_config_file_vllm_cannot_read_is_one_line(tmp_path: Path) -> None:
    """vLLM's parser fails with a traceback on an empty --config file, a list, a key not text or a YAML error, and logs
    a line of its own before a missing file's: each is refused first, in one line naming the file."""
    from llmfast.serve.vllm_flags import parse

    config = tmp_path / "vllm.yaml"
    for text, said in (("", " holds nothing"), ("- max-num-seqs\n", " holds a list"), ("1: 2\n", " holds the key 1"),
                       ("max-num-seqs: [2\n", r": cannot read it as YAML \(expected ',' or ']'")):
        config.write_text(text, encoding="utf-8")
        with pytest.raises(UserError, match=rf"^the vLLM flags after --: --config {config}{said}") as e:
            parse(["--config", str(config)])
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=rf"^the vLLM flags after --: --config {tmp_path / 'no.yaml'}: cannot read it"):
        parse(["--config", str(tmp_path / "no.yaml")])
    config.write_text("max-num-seqs: 2\n", encoding="utf-8")
    assert parse(["--config", str(config)])[0].max_num_seqs == 2
