"""The user's machine is not CI's: a kernel cache cut short, no home folder, stdout closed (s53's environment audit)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llmfast.cache import cache_dir
from llmfast.errors import UserError

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler here")
@pytest.mark.parametrize("size", [0, 4096])
def test_a_cached_kernel_cut_short_is_built_again(tmp_path: Path, size: int) -> None:
    """A library in the kernel cache cut short past its ELF header (a copied home folder, a crash before the disk
    caught up) was loaded as it was: dlopen maps pages beyond the file's end and the process died of SIGBUS (exit
    135, no message) in every verb that uses a kernel. Its bytes are checked against the hash in its name first."""
    source = tmp_path / "plus_one.c"
    source.write_text("static int table[1024] = {1};\nint plus_one(int x) { return x + table[0]; }\n")
    run = [sys.executable, "-c", "import sys; from pathlib import Path; from llmfast.native import load_kernel; "
           "print(load_kernel(Path(sys.argv[1])).plus_one(41))", str(source)]
    env = {**os.environ, "LLMFAST_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
    env.pop("LLMFAST_NATIVE", None)
    first = subprocess.run(run, env=env, capture_output=True, text=True)
    assert (first.returncode, first.stdout, first.stderr) == (0, "42\n", "")
    (built,) = (tmp_path / "cache" / "kernels").iterdir()
    whole = built.read_bytes()
    assert len(whole) > 3 * 4096  # past one page: a cut at 4096 leaves mapped segments beyond the end
    os.truncate(built, size)
    again = subprocess.run(run, env=env, capture_output=True, text=True)
    assert (again.returncode, again.stdout, again.stderr) == (0, "42\n", "")
    assert [p.name for p in (tmp_path / "cache" / "kernels").iterdir()] == [built.name]
    assert built.read_bytes() == whole  # built again, under the same name (its bytes' hash)


def test_no_home_folder_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """HOME unset for a uid the user database does not know (`docker run -u 1234`, `env -i`): Path.home() raised
    RuntimeError, a traceback from every verb (each locks its output in the cache)."""
    import pwd

    def unknown(uid: int) -> pwd.struct_passwd:
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.delenv("LLMFAST_CACHE", raising=False)
    monkeypatch.setattr(pwd, "getpwuid", unknown)
    with pytest.raises(UserError, match=r"^no home folder to keep llmfast's cache in \(\$HOME is unset and uid \d+ "
                                        r"has no entry in the user database\): set LLMFAST_CACHE \(or HOME\)"):
        cache_dir()
    monkeypatch.setenv("LLMFAST_CACHE", "/somewhere/cache")
    assert cache_dir() == Path("/somewhere/cache")


def test_bench_offline_with_stdout_closed_succeeds(tiny_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """`llmfast bench offline ... >&-` (stdout closed: sys.stdout is None) wrote its results, then failed with an
    AttributeError traceback (exit 1) flushing stdout."""
    from llmfast.cli import main

    out = tmp_path / "r.json"
    monkeypatch.setattr(sys, "stdout", None)
    code = main(["bench", "offline", str(tiny_dir), "--engine", "hf", "--num-prompts", "1", "--random-input-len", "4",
                 "--random-output-len", "2", "--ignore-eos", "--batch-size", "1", "--output", str(out)])
    assert code == 0
    assert json.loads(out.read_text())["completed"] == 1


def test_a_failed_build_names_the_compilers_error_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """gcc with a full TMPDIR: the assembler's first line is 'Assembler messages:', its error the next; the note
    named only the first."""
    from llmfast import native

    cc = tmp_path / "cc"
    cc.write_text("#!/bin/sh\n[ \"$1\" = --version ] && { echo fake 1; exit 0; }\n"
                  "echo '/tmp/x/ccAB.s: Assembler messages:' >&2\n"
                  "echo '/tmp/x/ccAB.s: Fatal error: cannot write 4 bytes: No space left on device' >&2\nexit 1\n")
    cc.chmod(0o755)
    source = tmp_path / "k.c"
    source.write_text("int k(void) { return 1; }\n")
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setenv("LLMFAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LLMFAST_NATIVE", raising=False)
    assert native.load_kernel.__wrapped__(source) is None  # type: ignore[attr-defined]
    assert capsys.readouterr().err == ("llmfast: building k.c failed (/tmp/x/ccAB.s: Fatal error: cannot write 4 bytes: "
                                       "No space left on device): k runs on its slower torch path\n")
    assert list((tmp_path / "cache" / "kernels").iterdir()) == []


def test_a_kernel_note_under_an_open_progress_bar_is_a_line_of_its_own(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A kernel is built at eval's first forward, under its open bar: the note was appended to the bar's line
    ('dates:   0%|          | 0/4 [00:00<?, ?ex/s]llmfast: no C compiler ...')."""
    import re

    from tqdm import tqdm

    from llmfast import native

    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.delenv("LLMFAST_NATIVE", raising=False)
    with tqdm(total=4, desc="dates", file=sys.stderr) as bar:
        bar.update()
        assert native.load_kernel.__wrapped__(tmp_path / "k.c") is None  # type: ignore[attr-defined]
    err = capsys.readouterr().err
    assert re.search(r"(^|[\r\n])llmfast: no C compiler \(set CC or install cc\): k runs on its slower torch path\n",
                     err), err


def test_a_non_ascii_model_path_under_an_ascii_locale_says_what_to_do(tiny_dir: Path, tmp_path: Path) -> None:
    """LC_ALL=C with PYTHONUTF8=0 (file names decoded as ASCII, surrogate-escaped): the Rust tokenizers library
    cannot be handed such a path, and the error said to restore the tokenizer's files, which were fine."""
    model = tmp_path / "modèle"
    shutil.copytree(tiny_dir, model)
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0", "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-c", "import sys; from llmfast.models import load_tokenizer\n"
                        "try: load_tokenizer(sys.argv[1])\nexcept Exception as e: print(e)", str(model)],
                       env=env, capture_output=True, text=True, errors="replace")
    assert p.returncode == 0, p.stderr
    assert p.stdout.endswith("the tokenizers library cannot open a path that is not ASCII while Python runs with the "
                             "ascii file-name encoding (an ASCII locale with PYTHONUTF8=0): run with PYTHONUTF8=1 (or "
                             "LC_ALL=C.UTF-8), or move the model to an ASCII path\n"), p.stdout
