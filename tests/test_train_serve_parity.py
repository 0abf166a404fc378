"""What a served model sees is what it was trained on: the token ids vLLM's OpenAI server builds for a
/v1/chat/completions request (vLLM's own renderer and tokenizer, run offline: no server start) equal the ids finetune
trained on up to the reply, for the built-in SmolLM2 and for tokenizers shipped as Llama 3's, Gemma's and ChatML's;
vLLM, eval and bench stop where the fine-tune taught the reply to end; adapters vLLM would serve with another template
or vocabulary than theirs are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from conftest import run_cli
from llmfast.data.chat import IGNORE, encode_messages
from llmfast.errors import UserError
from llmfast.models import load_tokenizer
from llmfast.serve.stops import stop_ids, turn_end, unstopped_note
from llmfast.testing import build_family_model

CHAT = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
        {"role": "user", "content": " And 3+3? "}, {"role": "assistant", "content": "6"}]
SYSTEM = [{"role": "system", "content": "Answer with digits."}, *CHAT]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, builtin_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parity")
    llama3 = build_family_model(root / "llama3", "llama3")
    return {"smollm2": builtin_dir, "llama3": llama3, "gemma": build_family_model(root / "gemma", "gemma", like=llama3),
            "chatml": build_family_model(root / "chatml", "chatml", like=llama3)}


def _adapter(base: Path, out: Path) -> Path:
    """A LoRA adapter on `base` saved as finetune saves its adapter/ (PEFT's files, the tokenizer finetune loaded),
    its B matrices nonzero so that the export differs from the base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from llmfast.loading import save_tokenizer

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=2, target_modules=["q_proj"]))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.01)
    model.save_pretrained(out)
    save_tokenizer(load_tokenizer(base), out)
    return out


class Vllm:
    """vLLM's own request path for a model folder, offline: its ModelConfig, the renderer (tokenizer and chat
    template) its OpenAI server builds, and the stop ids its engine gives a request."""

    def __init__(self, model: Path) -> None:
        from vllm.config import ModelConfig, VllmConfig
        from vllm.renderers.registry import renderer_from_config

        self.config = ModelConfig(model=str(model), max_model_len=512)
        self.renderer = renderer_from_config(VllmConfig(model_config=self.config))

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        request = ChatCompletionRequest(model="m", messages=messages)
        _, (prompt,) = self.renderer.render_chat([request.messages], request.build_chat_params(None, "auto"),
                                                 request.build_tok_params(self.config))
        return list(prompt["prompt_token_ids"])

    def stops(self) -> set[int]:
        """The ids a chat request stops at (vllm/v1/engine/input_processor.py: the tokenizer's EOS and the model's
        generation config's eos_token_id)."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=8)
        params.update_from_generation_config(self.config.try_get_generation_config(), self.renderer.get_eos_token_id())
        return set(params.all_stop_token_ids)


def _reply_start(labels: list[int]) -> int:
    """Where the last learned span (the last reply) starts: the ids before it are what the model saw."""
    return max(i for i in range(1, len(labels)) if labels[i] != IGNORE and labels[i - 1] == IGNORE)


def _learned_end(tok: Any, ex: Any) -> int:
    """The special token the fine-tune taught the model to end its last reply with."""
    special = set(tok.added_tokens_decoder)
    return next(t for t, label in zip(ex.input_ids[_reply_start(ex.labels):], ex.labels[_reply_start(ex.labels):])
                if label != IGNORE and t in special)


@pytest.fixture(scope="module")
def artifacts(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Per tiny family: its adapter and that adapter exported (merged), as a served artifact."""
    from llmfast.finetune.export import export_merged

    root = tmp_path_factory.mktemp("artifacts")
    out = {}
    for family in ("llama3", "gemma", "chatml"):
        adapter = _adapter(models[family], root / family / "adapter")
        out[family] = adapter, export_merged(adapter, root / family / "merged")
    return out


@pytest.mark.parametrize("family", ["smollm2", "llama3", "gemma", "chatml"])
def test_a_chat_request_is_served_as_it_was_trained(models: dict[str, Path], artifacts: dict[str, tuple[Path, Path]],
                                                    family: str) -> None:
    """The ids vLLM's server builds for the conversation before the last reply (with the generation prompt) are those
    finetune trained on before that reply, for the base (what `--lora` serves an adapter with) and for the exported
    artifact: the same template (SmolLM2's default system prompt where a row has none), one BOS (Llama 3's and
    Gemma's templates write it and their tokenizers add one: vLLM's chat requests add none), and the stop the reply
    was taught to end with is one vLLM stops at."""
    base = models[family]
    tok = load_tokenizer(base)  # finetune's: the base model's tokenizer
    served = [base] + ([artifacts[family][1]] if family in artifacts else [])
    for model in served:
        vllm = Vllm(model)
        for chat in ([CHAT] if family == "gemma" else [CHAT, SYSTEM]):  # Gemma's template refuses a system turn
            ex = encode_messages(tok, chat)
            start = _reply_start(ex.labels)
            assert vllm.chat_ids(chat[:-1]) == ex.input_ids[:start], (model, chat[0])
            if family in ("llama3", "gemma"):  # ChatML's (SmolLM2's) "BOS" is <|im_start|>, which opens every turn
                assert vllm.chat_ids(chat[:-1]).count(tok.bos_token_id) == 1
            assert _learned_end(tok, ex) in vllm.stops()
        # serve's reading of those stops (serve/stops.py) is vLLM's, and finds nothing to note
        assert stop_ids(model, load_tokenizer(model)) == vllm.stops()
        assert turn_end(load_tokenizer(model)) == _learned_end(tok, ex) and unstopped_note(model, tok) is None


def test_an_adapter_with_its_own_template_or_tokens_is_refused_for_lora_serving(
        models: dict[str, Path], artifacts: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    """vLLM renders and tokenizes an adapter's requests with the served model's tokenizer: an adapter saved with
    another chat template (Axolotl's `chat_template: chatml` on a Llama 3) would be served chats it was not trained
    on, so `--lora` refuses it in one line, and its export (which keeps the adapter's tokenizer) serves right. Tokens
    added in training are refused likewise; finetune's own adapter (the base's tokenizer) is served."""
    from llmfast.finetune.export import export_merged
    from llmfast.serve.lora import check_lora
    from llmfast.testing import CHATML_TEMPLATE

    base, (adapter, _) = models["llama3"], artifacts["llama3"]
    assert check_lora("ok", adapter, base=base).name == "ok"
    named = tmp_path / "named"  # the base's template as transformers 4 saved named ones: its default is the same
    shutil.copytree(base, named)
    template = (named / "chat_template.jinja").read_text(encoding="utf-8")
    (named / "chat_template.jinja").unlink()
    cfg = json.loads((named / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["chat_template"] = [{"name": "tool_use", "template": "{{ tools }}"}, {"name": "default", "template": template}]
    (named / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    assert check_lora("ok", adapter, base=named).name == "ok"
    chatml = tmp_path / "chatml"
    shutil.copytree(adapter, chatml)
    (chatml / "chat_template.jinja").write_text(CHATML_TEMPLATE, encoding="utf-8")
    with pytest.raises(UserError) as e:
        check_lora("chatml", chatml, base=base)
    assert str(e.value) == (f"LoRA 'chatml' was trained with another chat template than the served model {base} has, "
                            "and vLLM formats every adapter's chats with the served model's "
                            f"({chatml}): merge it with `llmfast export` and serve the merged model")
    # vLLM given its own --chat-template renders every chat with that one, not the base's: the choice is the user's
    from llmfast.serve.server import prepare_spec

    spec = prepare_spec(str(base), loras=[f"chatml={chatml}"],
                        extra_args=["--chat_template=" + str(chatml / "chat_template.jinja")])
    assert [a.name for a in spec.loras] == ["chatml"]
    trained = encode_messages(load_tokenizer(chatml), CHAT)
    prompt = trained.input_ids[:_reply_start(trained.labels)]
    assert Vllm(base).chat_ids(CHAT[:-1]) != prompt  # what --lora would have served it
    assert Vllm(export_merged(chatml, tmp_path / "merged")).chat_ids(CHAT[:-1]) == prompt
    grown = tmp_path / "grown"
    shutil.copytree(adapter, grown)
    tok = load_tokenizer(grown)
    tok.add_special_tokens({"pad_token": "[PAD]"})  # a pad token added to train with: no request holds it
    tok.save_pretrained(grown)
    assert check_lora("grown", grown, base=base).name == "grown"
    tok.add_tokens(["<|tool|>"])
    tok.save_pretrained(grown)
    new = tok.convert_tokens_to_ids("<|tool|>")
    with pytest.raises(UserError, match=rf"^LoRA 'grown' has tokens the served model's tokenizer lacks \('<\|tool\|>', "
                                         rf"id {new}; 1 in all\), and vLLM tokenizes every adapter's requests with"):
        check_lora("grown", grown, base=base)


def test_a_template_whose_turn_end_vllm_does_not_stop_at_is_noted(models: dict[str, Path], tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A base model shipped with a ChatML template whose eos_token and generation_config are <|endoftext|> (Qwen2.5's
    base models): a fine-tune teaches replies to end with <|im_end|>, which vLLM does not stop at, so every served
    reply runs on (writing the next user turn) to max_tokens. serve says so in one note line, naming the fix."""
    from transformers import AutoTokenizer

    from llmfast.serve.server import prepare_spec
    from llmfast.testing import CHATML_TEMPLATE

    model = tmp_path / "qwen-base"
    shutil.copytree(models["chatml"], model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.eos_token = tok.pad_token = "<|endoftext|>"
    tok.save_pretrained(model)
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    for name in ("config.json", "generation_config.json"):
        cfg = json.loads((model / name).read_text(encoding="utf-8"))
        (model / name).write_text(json.dumps({**cfg, "eos_token_id": eos}), encoding="utf-8")
    ex = encode_messages(load_tokenizer(model), CHAT)
    end = _learned_end(tok, ex)
    assert tok.convert_ids_to_tokens(end) == "<|im_end|>" and Vllm(model).stops() == {eos}  # vLLM's own reading
    # export writes the stop into a merged artifact of that base (the base is left as it is)
    from llmfast.finetune.export import export_merged

    merged = export_merged(_adapter(model, tmp_path / "adapter"), tmp_path / "merged")
    assert json.loads((merged / "generation_config.json").read_text())["eos_token_id"] == [eos, end]
    assert Vllm(merged).stops() == {eos, end}
    assert f"eos_token_id gains {end} (<|im_end|>), the chat template's end of a reply" in capsys.readouterr().err
    capsys.readouterr()
    prepare_spec(str(model))
    assert capsys.readouterr().err == (
        f"llmfast: note: {model}'s chat template ends a reply with <|im_end|> (id {end}), which vLLM does not stop "
        f"at (only at {eos}: the tokenizer's eos_token and generation_config.json's eos_token_id): a reply fine-tuned "
        f"on that template runs on to max_tokens; add {end} to eos_token_id in {model / 'generation_config.json'}\n")
    prepare_spec(str(models["chatml"]))
    assert capsys.readouterr().err == ""
    # vLLM's own --chat-template is the one it renders chats with: its turn end is the one judged
    given = tmp_path / "given.jinja"
    given.write_text(CHATML_TEMPLATE.replace("<|im_end|>", "<|endoftext|>"), encoding="utf-8")
    prepare_spec(str(models["chatml"]), extra_args=["--chat-template", str(given)])
    assert "'s chat template ends a reply with <|endoftext|>" in capsys.readouterr().err
    # what export can write into the merged artifact (serve/stops.add_turn_end_stop): vLLM and eval then stop there
    from llmfast.models import load_model
    from llmfast.serve.stops import add_turn_end_stop

    assert add_turn_end_stop(model, load_tokenizer(model)) == end and add_turn_end_stop(model, tok) is None
    assert Vllm(model).stops() == {eos, end} and load_model(model).generation_config.eos_token_id == [eos, end]
    assert unstopped_note(model, tok) is None


@pytest.mark.parametrize("family", ["smollm2", "llama3"])
def test_eval_prompts_a_task_row_as_its_fine_tune_trained_on_it(models: dict[str, Path], builtin: Any,
                                                                family: str) -> None:
    """A task row (llmfast/data/tasks.py: the rows `llmfast tasks` writes to train on and eval scores) reaches the
    model in eval as the ids finetune trained on before its answer, and as vLLM serves them: read off the model's
    own embedding input while eval generates (one BOS for Llama 3)."""
    from llmfast.data.chat import prompt_and_answer
    from llmfast.data.tasks import generate
    from llmfast.evaluate import generate_answers
    from llmfast.models import load_model

    row = {**generate("dates", 1, seed=5)[0], "_row": 1}
    model, tok = builtin if family == "smollm2" else (load_model(models[family]), load_tokenizer(models[family]))
    seen: list[list[int]] = []
    hook = model.get_input_embeddings().register_forward_pre_hook(lambda _m, a: seen.append(a[0][0].tolist()))
    try:
        generate_answers(model, tok, [prompt_and_answer(row, "test.jsonl")[0]], max_new_tokens=1)
    finally:
        hook.remove()
    ex = encode_messages(tok, row["messages"])
    assert seen[0] == ex.input_ids[:_reply_start(ex.labels)] == Vllm(models[family]).chat_ids(row["messages"][:1])


QWEN3_TEMPLATE = (  # Qwen3's, its reasoning and tool parts left out: the last reply opens with an empty think block
    "{%- for message in messages %}{%- if message.role == 'assistant' and loop.last %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + message.content }}{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content }}{%- endif %}{{- '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_a_reply_opened_with_added_tokens_ends_at_its_turn_end(models: dict[str, Path]) -> None:
    """Qwen3's template opens the reply it trains on with `<think>\\n\\n</think>` (added tokens, learned): the reply
    ends at <|im_end|>, which vLLM stops at, so nothing is noted; <think> is no stop (added as one, every reply
    would end before its first word)."""
    tok = load_tokenizer(models["chatml"])
    tok.add_tokens(["<think>", "</think>"])
    tok.chat_template = QWEN3_TEMPLATE
    ex = encode_messages(tok, CHAT[:2])  # one exchange: Qwen3's thinks only after the last user turn
    assert tok.convert_ids_to_tokens(ex.input_ids[_reply_start(ex.labels)]) == "<think>"
    assert turn_end(tok) == tok.convert_tokens_to_ids("<|im_end|>")
    assert unstopped_note(models["chatml"], tok) is None


def test_a_model_with_no_stop_at_all_is_noted_readably(models: dict[str, Path], tmp_path: Path) -> None:
    """No eos_token and no eos_token_id anywhere: vLLM stops at nothing, and the note says so."""
    tok = load_tokenizer(models["chatml"])
    tok.eos_token = None
    (tmp_path / "generation_config.json").write_text("{}", encoding="utf-8")
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert f"(id {end}), which vLLM does not stop at (only at no id: the tokenizer's" in unstopped_note(tmp_path, tok)


def test_eval_stops_where_vllm_stops(tmp_path: Path):
    """A Llama 3 fixed the common way (tokenizer eos_token <|eot_id|>, generation_config still <|end_of_text|>):
    vLLM stops at both, so eval's transformers generation must too, or its answers run on past the reply."""
    from transformers import AutoTokenizer

    from llmfast.evaluate import generate_answers
    from llmfast.models import load_model
    from llmfast.testing import script_greedy

    m = build_family_model(tmp_path / "l3", "llama3")
    tok = AutoTokenizer.from_pretrained(m)
    tok.eos_token = "<|eot_id|>"
    tok.save_pretrained(m)
    gen = json.loads((m / "generation_config.json").read_text())
    gen["eos_token_id"] = tok.convert_tokens_to_ids("<|end_of_text|>")
    (m / "generation_config.json").write_text(json.dumps(gen))
    chat = [{"role": "user", "content": "What is 2+2?"}]
    prompt = tok.apply_chat_template(chat, add_generation_prompt=True)
    prompt = prompt if isinstance(prompt, list) else prompt["input_ids"]
    four, other = tok.encode("4", add_special_tokens=False)[0], tok.encode(" user", add_special_tokens=False)[0]
    end = tok.convert_tokens_to_ids("<|eot_id|>")
    script_greedy(m, {prompt[-1]: four, four: end, end: other, other: other})  # "4", then the turn's end
    assert end in stop_ids(m, load_tokenizer(m))  # vLLM's stops, as SamplingParams builds them
    assert generate_answers(load_model(m), load_tokenizer(m), [chat], max_new_tokens=6) == ["4"]


def test_eval_of_an_adapter_prompts_with_the_adapters_own_template(tmp_path: Path):
    """An adapter saved with the chat template it was trained with (another than its base's: e.g. a tool's own
    template on a Llama 3 base) is evaluated with that template, as export merges it: eval loaded the base's."""
    from transformers import AutoTokenizer

    from llmfast.testing import script_greedy

    base = build_family_model(tmp_path / "l3", "llama3")
    tok = AutoTokenizer.from_pretrained(base)
    tok.chat_template = ("{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}### reply:{% endif %}")
    chat = [{"role": "user", "content": "What is 2+2?"}]
    prompt = tok.apply_chat_template(chat, add_generation_prompt=True)
    prompt = prompt if isinstance(prompt, list) else prompt["input_ids"]
    four = tok.encode("4", add_special_tokens=False)[0]
    script_greedy(base, {prompt[-1]: four, four: tok.eos_token_id})  # the adapter's prompt gets "4", then the end
    adapter = _adapter(base, tmp_path / "adapter")  # its B matrices change q_proj only: attention adds nothing here
    tok.save_pretrained(adapter)
    rows = tmp_path / "t.jsonl"
    rows.write_text(json.dumps({"messages": [*chat, {"role": "assistant", "content": "4"}]}) + "\n")
    recipe = tmp_path / "eval.yaml"
    recipe.write_text(f"model: {base}\nadapter: {adapter}\neval:\n  tasks: [{{name: mine, path: {rows}}}]\n")
    code, _, err = run_cli("eval", str(recipe), "--output", str(tmp_path / "r.json"))
    assert code == 0, err
    assert json.loads((tmp_path / "r.json").read_text())["tasks"]["mine"]["accuracy"] == 1.0
    # an adapter with a tokenizer_config.json and no vocabulary: no tokenizer loads from it, so the base's is used
    for f in ("tokenizer.json", "chat_template.jinja", "special_tokens_map.json"):
        (adapter / f).unlink(missing_ok=True)
    code, _, err = run_cli("eval", str(recipe), "--output", str(tmp_path / "r2.json"))
    assert code == 0, err
    assert json.loads((tmp_path / "r2.json").read_text())["tasks"]["mine"]["accuracy"] == 0.0  # the base's template


def test_the_turn_end_note_costs_no_transformers_import_where_the_template_writes_the_eos(builtin_dir: Path):
    """SmolLM2's template ends each turn with its EOS token written out: the note is known from the files, so
    `serve` does not import transformers (~4 s here) before vLLM starts; a template that does not is checked in full
    (the Qwen2.5-base case above)."""
    import subprocess
    import sys

    code = ("import sys; from pathlib import Path; from llmfast.serve.stops import served_note; "
            "print(served_note(Path(sys.argv[1])), 'transformers' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code, str(builtin_dir)], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout == "None False\n", p.stderr[-2000:]


def test_each_turn_of_a_conversation_qwen3_renders_otherwise_is_trained_as_served(models: dict[str, Path],
                                                                                   tmp_path: Path) -> None:
    """Qwen3's template drops every earlier reply's think block once a later user turn follows, so no one encoding
    of a multi-turn row is what vLLM sends at each turn: each assistant turn is its own example, and the ids before
    its reply are those vLLM's server builds for the conversation up to it (the template's <think> tokens added to
    the tokenizer, as Qwen3's are)."""
    from transformers import AutoTokenizer

    from llmfast.data.chat import encode_conversation
    from test_chat_turns import CHAT as THINKING, QWEN3_STYLE

    model = tmp_path / "qwen3"
    shutil.copytree(models["chatml"], model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.add_tokens(["<think>", "</think>"])
    tok.chat_template = QWEN3_STYLE
    tok.save_pretrained(model)
    vllm, tok = Vllm(model), load_tokenizer(model)
    turns = [i for i, m in enumerate(THINKING) if m["role"] == "assistant"]
    examples = encode_conversation(tok, THINKING)
    assert len(examples) == len(turns) == 3
    for ex, i in zip(examples, turns):
        assert vllm.chat_ids(THINKING[:i]) == ex.input_ids[:_reply_start(ex.labels)], i
    # the conversation rendered whole holds the first reply without the think block it was served and trained with
    whole = tok(tok.apply_chat_template(THINKING, tokenize=False), add_special_tokens=False).input_ids
    assert whole[: len(examples[0])] != examples[0].input_ids
