"""Files this user may not read or write: every verb ends with one error line naming the file and exit 2, before
its work where a check can see it (a recipe's paths, the files a merge copies, serve's log), and never with a
traceback. The permissions are real: the CLI runs in a subprocess as this user, and as root with the capabilities
that bypass file modes dropped (`setpriv`), since root reads a mode-000 file; skipped where neither is possible."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import file_modes_prefix, run_cli
from llmfast.errors import as_user_error


def _cli(tmp_path: Path, hide: list[Path], *args: str) -> tuple[int, str]:
    """Run `llmfast ARGS` with `hide` (files or folders) made mode 000 for the run (restored after); return the
    exit code and stderr."""
    prefix = file_modes_prefix(tmp_path)
    modes = {p: p.stat().st_mode for p in hide}
    for p in hide:
        p.chmod(0)
    try:
        proc = subprocess.run([*prefix, sys.executable, "-m", "llmfast.cli", *args], capture_output=True, text=True,
                              timeout=300, cwd=Path(__file__).resolve().parent.parent)
    finally:
        for p, mode in modes.items():
            p.chmod(mode)
    return proc.returncode, proc.stderr


def _last(err: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    return err.strip().splitlines()[-1]


@pytest.fixture
def finetune_recipe(tmp_path: Path, tiny_dir: Path) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"Repeat: {w}"}, {"role": "assistant", "content": w}]}
            for w in ["alpha", "bravo"] * 4]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp_path / "ft.yaml"
    recipe.write_text(f"model: {tiny_dir}\ndata:\n  train: {tmp_path / 'train.jsonl'}\n  max_length: 64\n"
                      f"lora: {{r: 4, alpha: 8}}\ntrain: {{steps: 1, batch_size: 2}}\noutput: {tmp_path / 'out'}\n")
    return recipe


def test_unreadable_recipe_is_one_line(tmp_path, finetune_recipe):
    code, err = _cli(tmp_path, [finetune_recipe], "finetune", str(finetune_recipe))
    assert code == 2, err[-2000:]
    assert _last(err) == (f"llmfast: error: recipe {finetune_recipe} cannot be read (Permission denied): make it "
                          "readable for this user")
    assert not (tmp_path / "out").exists()


def test_unreadable_data_file_is_blamed_on_the_recipe_line(tmp_path, finetune_recipe):
    data = tmp_path / "train.jsonl"
    code, err = _cli(tmp_path, [data], "finetune", str(finetune_recipe))
    assert code == 2, err[-2000:]
    assert _last(err).startswith(f"llmfast: error: {finetune_recipe}:3: data.train: {data}: no permission to read "
                                 "it: make it readable"), err
    assert not (tmp_path / "out").exists()


def test_a_folder_given_for_a_file_is_named_as_one(tmp_path, tiny_dir):
    recipe = tmp_path / "ev.yaml"
    recipe.write_text(f"model: {tiny_dir}\neval:\n  tasks: []\n  perplexity: {{text: {tmp_path}, max_tokens: 64}}\n")
    code, _out, err = run_cli("eval", str(recipe), "--output", str(tmp_path / "r.json"))
    assert code == 2
    assert _last(err) == (f"llmfast: error: {recipe}:4: eval.perplexity.text: {tmp_path} is a folder: give a file "
                          f"(got '{tmp_path}')")


def _merge_of_two_copies(tmp_path: Path, tiny_dir: Path) -> tuple[Path, Path]:
    """Two copies of the tiny model (base, other) and a linear merge config of them: (base, config)."""
    base, other = tmp_path / "base", tmp_path / "other"
    shutil.copytree(tiny_dir, base)
    shutil.copytree(tiny_dir, other)
    config = tmp_path / "m.yaml"
    config.write_text(f"merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 0.5}}\n"
                      f"  - model: {other}\n    parameters: {{weight: 0.5}}\n")
    return base, config


def test_merge_refuses_an_unreadable_tokenizer_before_merging(tmp_path, tiny_dir):
    """The tokenizer files are copied after the tensors are merged: found unreadable, the merge of an 8B model
    would be lost minutes later. Checked with the inputs instead."""
    base, config = _merge_of_two_copies(tmp_path, tiny_dir)
    code, err = _cli(tmp_path, [base / "tokenizer.json"], "merge", str(config), str(tmp_path / "out"))
    assert code == 2, err[-2000:]
    assert _last(err) == (f"llmfast: error: {base / 'tokenizer.json'}: no permission to read it (the output takes it "
                          f"from {base}): make it readable for this user")
    assert "tensor/s" not in err  # no merge progress: refused before the work
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "m.yaml", "other"]


def test_serve_refuses_a_log_it_cannot_write_before_starting_vllm(tmp_path, tiny_dir):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        code, err = _cli(tmp_path, [], "serve", str(tiny_dir), "--log", str(ro / "s.log"))
    finally:
        ro.chmod(0o755)
    assert code == 2, err[-2000:]
    assert _last(err) == f"llmfast: error: output {ro / 's.log'}: no permission to write in {ro}"
    assert "starting vLLM" not in err


def test_a_denied_file_met_anywhere_else_is_one_line_naming_it():
    """The CLI's catch-all for what no check saw first; a process call's EPERM (no file named) stays a bug."""
    e = PermissionError(errno.EACCES, "Permission denied", "/data/model/tokenizer.json")
    assert str(as_user_error(e)) == ("/data/model/tokenizer.json: Permission denied: give this user permission to "
                                     "use it (or use another path) and run again")
    try:
        raise RuntimeError("while copying") from OSError(errno.EROFS, "Read-only file system", "/mnt/ro/x", None, "/b")
    except RuntimeError as wrapped:
        assert str(as_user_error(wrapped)).startswith("/mnt/ro/x or /b: Read-only file system: give this user")
    assert as_user_error(PermissionError(errno.EPERM, "Operation not permitted")) is None
    try:  # a bug met while handling a denied file keeps its traceback (raised *during*, not *from*, the denial)
        try:
            raise PermissionError(errno.EACCES, "Permission denied", "/models/m/cache.bin")
        except PermissionError:
            raise KeyError("model.layers.0")
    except KeyError as bug:
        assert as_user_error(bug) is None
    try:  # a full disk met in a fallback after a refused hard link is a full disk
        try:
            raise PermissionError(errno.EPERM, "Operation not permitted", "/models/m/w.safetensors", None, "/o/w")
        except PermissionError:
            raise OSError(errno.ENOSPC, "No space left on device", "/o/w")
    except OSError as full:
        assert str(as_user_error(full)).startswith("no space left on the device of /o:")


def test_serve_takes_an_existing_writable_log_in_a_folder_it_cannot_write(tmp_path):
    """vLLM opens an existing log as it is: only the file must be writable (its folder need not be, as /dev for
    /dev/null). The model that does not exist is what is refused, after the log passed."""
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "s.log").write_text("")
    (ro / "s.log").chmod(0o666)
    ro.chmod(0o555)
    try:
        code, err = _cli(tmp_path, [], "serve", str(tmp_path / "no-such-model"), "--log", str(ro / "s.log"))
    finally:
        ro.chmod(0o755)
    assert code == 2 and "no-such-model" in _last(err) and "--log" not in _last(err), err[-2000:]


def test_quantize_refuses_an_unreadable_generation_config(tmp_path, tiny_dir):
    """transformers loads a model whose generation_config.json it may not read with default generation settings,
    silently, and the artifact kept those (found by hand, s41): refused before the model loads."""
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    recipe = tmp_path / "q.yaml"
    recipe.write_text(f"model: {model}\nquantization: {{method: bnb4, type: nf4}}\noutput: {tmp_path / 'out'}\n")
    hidden = model / "generation_config.json"
    code, err = _cli(tmp_path, [hidden], "quantize", str(recipe))
    assert code == 2, err[-2000:]
    assert _last(err).startswith(f"llmfast: error: {hidden}: no permission to read it (transformers would go on with "
                                 "default generation settings"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "q.yaml"]


def test_overwrite_of_a_read_only_output_or_a_link_is_refused_before_the_work(tmp_path, tiny_dir):
    """`--overwrite` moves the old output aside once the new one is complete, which needs write permission on the
    old folder itself: a read-only one failed after all the work and left an empty `.OUT.old-*` (s43's review).
    A link as the output was replaced by a folder, its target left as it was."""
    base, config = _merge_of_two_copies(tmp_path, tiny_dir)
    out = tmp_path / "out"
    assert run_cli("merge", str(config), str(out))[0] == 0
    before = sorted(p.name for p in tmp_path.iterdir())
    prefix = file_modes_prefix(tmp_path)
    out.chmod(0o555)
    try:
        proc = subprocess.run([*prefix, sys.executable, "-m", "llmfast.cli", "merge", str(config), str(out),
                               "--overwrite"], capture_output=True, text=True, timeout=300,
                              cwd=Path(__file__).resolve().parent.parent)
    finally:
        out.chmod(0o755)
    assert proc.returncode == 2 and _last(proc.stderr) == (
        f"llmfast: error: output {out} is read-only, so --overwrite cannot replace it: make it writable (chmod u+w "
        f"{out}), or choose another path")
    assert "tensor/s" not in proc.stderr and sorted(p.name for p in tmp_path.iterdir()) == before
    (tmp_path / "latest").symlink_to(out)
    code, _, err = run_cli("merge", str(config), str(tmp_path / "latest"), "--overwrite")
    assert code == 2 and "is a symbolic link (to " in err and (tmp_path / "latest").is_symlink(), err


def test_a_data_folder_is_readable_by_its_x_bit(tmp_path, finetune_recipe):
    """A folder's files are opened by name, which needs its x bit, not its r bit: one without x is refused at the
    recipe's key, one with x and no r passes that check (s46's mutation audit: only files were tested)."""
    prefix = file_modes_prefix(tmp_path)
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "state.json").write_text("{}")
    said = f"data.train: {folder}: no permission to read it"

    def run(mode: int) -> str:
        folder.chmod(mode)
        try:
            return subprocess.run([*prefix, sys.executable, "-m", "llmfast.cli", "finetune", str(finetune_recipe),
                                   "--set", f"data.train={folder}"], capture_output=True, text=True, timeout=300,
                                  cwd=Path(__file__).resolve().parent.parent).stderr
        finally:
            folder.chmod(0o755)

    assert _last(run(0o600)) == f"llmfast: error: {finetune_recipe} (--set data.train): {said}: make it readable " \
                                f"for this user (chmod) or give a copy (got '{folder}')"
    assert said not in run(0o300)
    assert not (tmp_path / "out").exists()
