"""The console script: help for every verb, one-line errors with exit code 2, --debug tracebacks."""

import argparse
import re
import subprocess
import sys

import pytest

from conftest import REPO, run_cli

VERBS = ["models", "eval", "tasks"]


def _llmfast(*args):
    exe = [sys.executable, "-m", "llmfast.cli"]
    return subprocess.run([*exe, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("verb", [None, *VERBS])
def test_help(verb):
    p = _llmfast(*([verb] if verb else []), "--help")
    assert p.returncode == 0 and "usage: llmfast" in p.stdout


def test_console_script_user_error_exit_2_one_line(tmp_path):
    p = _llmfast("eval", str(tmp_path / "missing.yaml"))
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "missing.yaml not found" in p.stderr
    assert "Traceback" not in p.stderr


def test_unknown_verb_and_bad_flag():
    code, _, err = run_cli("fly")
    assert code == 2 and "invalid choice: 'fly'" in err and err.count("\n") == 1
    code, _, err = run_cli("eval", "x.yaml", "--frobnicate")
    assert code == 2 and "unrecognized arguments: --frobnicate" in err


def test_debug_shows_traceback(tmp_path):
    p = _llmfast("--debug", "eval", str(tmp_path / "missing.yaml"))
    assert p.returncode != 0 and "Traceback" in p.stderr and "UserError" in p.stderr


def test_debug_after_the_verb_is_the_same_flag():
    """`llmfast finetune R --debug` was an unrecognized argument, shown as a traceback (found by hand, s42); what
    follows serve's `--` stays vLLM's."""
    from llmfast.cli import parse_args

    assert parse_args(["eval", "r.yaml", "--debug"]).debug and not parse_args(["eval", "r.yaml"]).debug
    args = parse_args(["serve", "m", "--debug", "--", "--max-num-seqs", "8", "--debug"])
    assert args.debug and args.vllm_args == ["--max-num-seqs", "8", "--debug"]
    assert parse_args(["--debug", "serve", "m", "--", "-O3"]).vllm_args == ["-O3"]


def test_only_the_serve_verb_passes_what_follows_dashes_to_vllm():
    """`bench serve ... -- --request-rate abc` ran with the flags after `--` silently dropped (`"serve" in argv` took
    bench's subcommand for the verb, s48): bench takes no pass-through, so it is argparse's usage error."""
    code, _, err = run_cli("bench", "serve", "--port", "9", "--", "--request-rate", "abc")
    assert code == 2 and err.strip().splitlines()[-1].startswith(
        "llmfast: error: unrecognized arguments: -- --request-rate abc"), err


def test_bench_serve_sweeps_take_each_value_once_and_no_nan(tmp_path):
    """A repeated value's results replaced the first's; `--request-rate nan` ran; `--burstiness 0` was refused on the
    requests' progress bar (found by hand, s42): all before the first request."""
    base = ["bench", "serve", "--base-url", "http://127.0.0.1:9", "--num-prompts", "1"]
    for flags, said in ((["--max-concurrency", "1,1"], "--max-concurrency '1,1': 1 is given twice"),
                        (["--request-rate", "nan"], "--request-rate 'nan': values must be positive"),
                        (["--burstiness", "0"], "--burstiness 0.0: must be positive"),
                        # written as `"burstiness": Infinity`, not JSON (s51)
                        (["--burstiness", "inf"], "--burstiness inf: must be positive and finite"),
                        # sent on as JSON NaN (s48)
                        (["--temperature", "nan"], "argument --temperature: 'nan': give a finite number"),
                        (["--top-p=-inf"], "argument --top-p: '-inf': give a finite number")):
        code, _, err = run_cli(*base, *flags)
        assert code == 2 and said in err.strip().splitlines()[-1], err


def test_no_verb_prints_help():
    p = _llmfast()
    assert p.returncode == 2 and "VERB" in p.stdout


def test_usage_errors_do_not_repeat_llmfast():
    code, _, err = run_cli("fly")
    assert err.startswith("llmfast: error: argument VERB: invalid choice: 'fly'") and "llmfast: llmfast" not in err
    code, _, err = run_cli("finetune")
    assert code == 2 and err.startswith("llmfast: error: finetune: the following arguments are required: recipe")
    code, _, err = run_cli("bench", "nope")
    assert code == 2 and err.startswith("llmfast: error: bench: argument KIND: invalid choice: 'nope'")


def test_a_recipe_named_like_an_option_gets_a_hint(tmp_path, monkeypatch):
    """argparse took a recipe file "-x.yaml" for an option: "the following arguments are required: recipe", no
    word on why (s43's review)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "-x.yaml").write_text("model: m\n")
    code, _, err = run_cli("eval", "-x.yaml")
    assert code == 2 and err.strip().splitlines() == [
        "llmfast: error: eval: the following arguments are required: recipe (see llmfast eval --help); -x.yaml is a "
        "file: write ./-x.yaml or put -- before it"]
    code, _, err = run_cli("eval", "--frobnicate")  # an option that is no file: as before
    assert code == 2 and "is a file" not in err and "required: recipe" in err
    code, _, err = run_cli("eval", "./-x.yaml")  # the hint's way reads the recipe
    assert code == 2 and "-x.yaml" in err and "required: recipe" not in err


def test_finetune_help_names_torchrun_for_several_processes():
    p = _llmfast("finetune", "--help")
    text = " ".join(p.stdout.split())
    assert p.returncode == 0 and "torchrun --nproc_per_node N -m llmfast.cli finetune" in text


def _errs_without_torch(*args: str) -> str:
    """Run the CLI in a fresh interpreter; assert exit 2 with torch never imported; return stderr."""
    code = ("import sys; from llmfast.cli import main; rc = main(sys.argv[1:]); "
            "heavy = [m for m in ('torch', 'transformers', 'accelerate', 'peft') if m in sys.modules]; "
            "assert rc == 2 and not heavy, (rc, heavy); sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    return p.stderr


def test_recipe_data_model_and_output_errors_answer_before_torch_is_imported(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{broken")
    (tmp_path / "ok.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "completion": 5}\n')
    (tmp_path / "out").write_text("a file")
    recipe = tmp_path / "r.yaml"

    def write(model: str, data: str, out: str) -> str:
        recipe.write_text(f"model: {model}\ndata: {{train: {data}}}\noutput: {out}\n")
        return str(recipe)

    assert "lora.rr" in _errs_without_torch("finetune", write("x", tmp_path / "ok.jsonl", tmp_path / "o"),
                                            "--set", "lora.rr=2")
    assert "bad.jsonl:1: field 'completion'" in _errs_without_torch(
        "finetune", write("builtin:smollm2-135m", tmp_path / "bad.jsonl", tmp_path / "o"))
    assert "config.json: the model config is not valid JSON" in _errs_without_torch(
        "finetune", write(tmp_path / "model", tmp_path / "ok.jsonl", tmp_path / "o"))
    assert "is a file, not a directory" in _errs_without_torch(
        "finetune", write("builtin:smollm2-135m", tmp_path / "ok.jsonl", tmp_path / "out"))
    (tmp_path / "e.yaml").write_text(f"model: {tmp_path / 'model'}\neval:\n  tasks: [{{name: t, path: "
                                     f"{tmp_path / 'bad.jsonl'}}}]\noutput: {tmp_path / 'res.json'}\n")
    assert "bad.jsonl:1: field 'completion'" in _errs_without_torch("eval", str(tmp_path / "e.yaml"))


def test_serve_numbers_are_checked_before_vllm_starts(tiny_dir):
    """`--max-model-len 0` and `--tensor-parallel-size 0` were dropped, a negative max-model-len passed to vLLM, a
    negative --timeout accepted, and a max-model-len beyond the model's positions refused by vLLM after its start-up
    (found by hand, s42): each one line, before anything starts."""
    for flags, said in ((["--max-model-len", "0"], "argument --max-model-len: '0': give a positive number"),
                        (["--tensor-parallel-size", "0"], "argument --tensor-parallel-size: '0': give a positive"),
                        (["--timeout", "-5"], "argument --timeout: '-5': give a positive number"),
                        (["--max-model-len", "999999"], "--max-model-len is 999999 tokens, beyond the 2048 positions"),
                        # vLLM refused these after a start-up of tens of seconds (s47): the tiny model has 2 heads
                        # and 2 layers, this machine 2 cores or more
                        (["--tensor-parallel-size", "3"], "tiny-llama/config.json has 2 attention heads"),
                        (["--pipeline-parallel-size", "3"], "--pipeline-parallel-size 3: ")):
        code, _, err = run_cli("serve", str(tiny_dir), *flags)
        assert code == 2 and said in err.strip().splitlines()[-1] and "starting vLLM" not in err, err


def test_a_task_named_twice_is_made_once(tmp_path):
    code, out, err = run_cli("tasks", "dates", "dates", "--out", str(tmp_path / "t"), "--train", "4", "--test", "2")
    assert code == 0, err
    assert len(out.strip().splitlines()) == 1 and sorted(p.name for p in (tmp_path / "t").iterdir()) == ["dates"]


def test_stop_on_signals_takes_only_default_handlers_and_restores_them():
    """SIGTERM and SIGHUP at their default (which would end the process without cleanup) raise instead; one ignored,
    as nohup leaves SIGHUP, stays ignored, and one a host program handles stays its; restore puts back what was
    replaced and nothing else (s44: the nohup case had no test)."""
    import signal

    from llmfast.process_exit import raise_interrupt, restore_signals, stop_on_signals

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        previous = stop_on_signals()
        assert previous == {signal.SIGTERM: signal.SIG_DFL}
        assert signal.getsignal(signal.SIGTERM) is raise_interrupt and signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        restore_signals(previous)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and signal.getsignal(signal.SIGHUP) is signal.SIG_IGN

        def host(signum, frame):
            pass

        signal.signal(signal.SIGTERM, host)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        previous = stop_on_signals()
        assert previous == {signal.SIGHUP: signal.SIG_DFL} and signal.getsignal(signal.SIGTERM) is host
        restore_signals(previous)
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def test_a_bug_keeps_its_traceback(monkeypatch):
    """Only a user's mistake is one line: an error that is no UserError (a bug) propagates with its traceback, never
    `llmfast: error: None` and exit 2 (s46's mutation audit)."""
    from llmfast import cli

    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "cmd_models", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["models"])


def test_double_dash_ends_the_options_of_any_verb(tmp_path, monkeypatch):
    """The hint for a recipe named like an option says `put -- before it`: for verbs other than serve (whose `--`
    starts vLLM's flags) that must read the recipe (s46's mutation audit)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "-x.yaml").write_text("model: m\n")
    code, _, err = run_cli("eval", "--", "-x.yaml")
    assert code == 2 and err.strip().splitlines() == [
        "llmfast: error: -x.yaml:1: required key 'eval' is missing"], err


def test_eval_output_and_model_flags_are_taken_as_text(tmp_path):
    """`--output 2024-01-03` or `--model 1.5` would be YAML's date and number, refused as no path (they are quoted
    into the overrides; s46's mutation audit): the run goes on to the model, which is not there."""
    recipe = tmp_path / "e.yaml"
    dates = REPO / "eval" / "tasks" / "dates" / "test.jsonl"
    recipe.write_text(f"model: m\neval: {{tasks: [{{name: d, path: {dates}}}]}}\n")
    for flag, value in (("--output", "2024-01-03"), ("--model", "1.5")):
        code, _, err = run_cli("eval", str(recipe), flag, value, *(["--model", "1.5"] if flag == "--output" else []))
        last = err.strip().splitlines()[-1]
        assert code == 2 and "quote it" not in last and "1.5" in last, err


def test_an_error_in_evals_output_flag_names_the_flag(tmp_path):
    """`eval --output DIR/` said `(--set output)`, a --set the user never wrote (s46's docs review); a --set output
    still names its --set."""
    recipe = tmp_path / "e.yaml"
    recipe.write_text(f"model: m\neval: {{tasks: [{{name: d, path: {REPO / 'eval' / 'tasks' / 'dates' / 'test.jsonl'}}}]}}\n")
    for args, said in ((["--output", f"{tmp_path}/"], "e.yaml (--output): output:"),
                       (["--set", f"output={tmp_path}/"], "e.yaml (--set output): output:")):
        code, _, err = run_cli("eval", str(recipe), *args)
        assert code == 2 and said in err.strip().splitlines()[-1] and "names a folder" in err, err


def test_python_dash_m_llmfast_is_the_command():
    p = subprocess.run([sys.executable, "-m", "llmfast", "eval", "/nonexistent/r.yaml"], capture_output=True, text=True,
                       cwd=REPO)
    assert p.returncode == 2 and p.stderr.strip() == "llmfast: error: recipe /nonexistent/r.yaml not found", p.stderr


def test_finetune_takes_an_existing_empty_output_folder(tmp_path):
    """docs/finetune.md: the output `must not exist or be empty`; an empty folder (made ahead for a job's logs) is
    taken, one holding files is refused (s46's mutation audit)."""
    from llmfast.errors import UserError
    from llmfast.preflight import check_finetune_inputs
    from llmfast.recipe import FinetuneRecipe, load_recipe

    (tmp_path / "train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    (tmp_path / "out").mkdir()
    recipe = tmp_path / "ft.yaml"
    recipe.write_text(f"model: builtin:smollm2-135m\ndata: {{train: {tmp_path / 'train.jsonl'}}}\n"
                      f"output: {tmp_path / 'out'}\n")
    check_finetune_inputs(load_recipe(recipe, FinetuneRecipe), resume=False)
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=f"{tmp_path / 'out'} already exists and holds {tmp_path / 'out'}/notes.txt, "
                                        "which a run of llmfast does not write: choose another output"):
        check_finetune_inputs(load_recipe(recipe, FinetuneRecipe), resume=False)


def test_debug_after_serves_double_dash_is_vllms_not_llmfasts(tmp_path, monkeypatch):
    """parse_args leaves what follows serve's `--` to vLLM, but main() read `--debug` anywhere in the line: a
    refused serve printed a traceback instead of its one line (s46's mutation audit)."""
    monkeypatch.delenv("LLMFAST_DEBUG", raising=False)
    code, _, err = run_cli("serve", str(tmp_path / "nope"), "--", "--debug")
    assert code == 2 and err.count("\n") == 1 and err.startswith("llmfast: error: ") and "nope" in err, err


def _doc_commands():
    """Every `llmfast VERB ...` command in README.md and docs/*.md (fenced blocks, continued lines joined, and
    inline code): (file, verb path, command)."""
    import re

    found = []
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = doc.read_text(encoding="utf-8")
        blocks = re.findall(r"```[^\n]*\n(.*?)```", text, re.S)
        code = [l for b in blocks for l in b.replace("\\\n", " ").splitlines()]
        code += re.findall(r"`([^`\n]*)`", re.sub(r"```.*?```", "", text, flags=re.S))
        for line in code:
            for m in re.finditer(r"\bllmfast ((?:bench )?[a-z]+)(\s[^#]*)?", line):
                found.append((doc.name, m.group(1), m.group(0)))
    return found


def test_the_docs_commands_use_flags_that_exist():
    """A flag renamed or dropped leaves README/docs commands that fail with a usage error: each `--flag` of a
    documented command (before serve's `--`, vLLM's) is one its verb takes."""
    from llmfast.cli import build_parser

    def verbs(parser):
        return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices

    top, wrong, seen = build_parser(), [], 0
    for doc, verb, command in _doc_commands():
        parser = top
        try:
            for w in verb.split():
                parser = verbs(parser)[w]
        except KeyError:
            continue  # prose such as `llmfast does ...`
        for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", command.split(" -- ")[0]):
            seen += 1
            if flag not in parser._option_string_actions:
                wrong.append(f"{doc}: {command.strip()[:80]}: {flag}")
    assert seen > 30 and not wrong, wrong


def test_every_option_with_a_default_says_it_in_help():
    """`llmfast bench serve --help` listed `--num-prompts NUM_PROMPTS` with no word of its 1000 (and 30 more of bench,
    serve and tasks without theirs): each option's help block names its default (switches and unset ones aside)."""
    from llmfast.cli import build_parser

    def walk(parser):
        yield parser
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for p in a.choices.values():
                    yield from walk(p)

    untold, seen = [], 0
    for parser in walk(build_parser()):
        for a in parser._actions:
            d = a.default
            if not a.option_strings or d is None or d is False or d == [] or d is argparse.SUPPRESS:
                continue
            seen += 1
            block = " ".join(parser._get_formatter()._format_action(a).split())
            if "default" not in block:
                untold.append(f"{parser.prog} {a.option_strings[-1]}")
    assert seen > 30 and not untold, untold
