"""The console script: help for every verb, one-line errors with exit code 2, --debug tracebacks."""

import subprocess
import sys

import pytest

from conftest import run_cli

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


def test_no_verb_prints_help():
    p = _llmfast()
    assert p.returncode == 2 and "VERB" in p.stdout
