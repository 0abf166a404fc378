"""A full disk: every verb that writes ends with one error line naming the folder and exit 2, and leaves nothing it
started (the temporary sibling removed, a log cut back to whole lines), instead of a traceback from safetensors,
torch.save or os.sendfile. The disks are real: small tmpfs mounts (skipped where this user may not mount one)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli


@pytest.fixture
def small_disk(tmp_path):
    """make(size) -> a folder on a fresh tmpfs of `size` (e.g. "1M"), unmounted after the test."""
    mounted: list[Path] = []

    def make(size: str) -> Path:
        d = tmp_path / f"disk{len(mounted)}"
        d.mkdir()
        try:
            p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True,
                               text=True)
        except FileNotFoundError:
            pytest.skip("no mount command here: a small file system cannot be made")
        if p.returncode != 0:
            pytest.skip(f"cannot mount a small file system here: {p.stderr.strip()[:120]}")
        mounted.append(d)
        return d

    yield make
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def _contents(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


def _refused(code: int, err: str, disk: Path, name: str) -> None:
    last = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err, err[-3000:]
    assert last.startswith(f"llmfast: error: no space left on the device of {disk}") and f"writing {name}" in last, last


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory, tiny_dir):
    d = tmp_path_factory.mktemp("adapter")
    rows = [{"messages": [{"role": "user", "content": f"Repeat: {w}"}, {"role": "assistant", "content": w}]}
            for w in ["alpha", "bravo", "charlie", "delta"] * 4]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "r.yaml").write_text(f"model: {tiny_dir}\ndata: {{train: {d / 'train.jsonl'}, max_length: 64}}\n"
                              f"lora: {{r: 8, alpha: 16}}\ntrain: {{steps: 2, batch_size: 2, lr: 0.003}}\n"
                              f"output: {d / 'run'}\n")
    code, _, err = run_cli("finetune", str(d / "r.yaml"))
    assert code == 0, err
    return d / "run" / "adapter"


def test_merge_and_export_are_refused_before_their_work_where_the_disk_is_too_small(small_disk, tiny_dir,
                                                                                      trained_adapter, tmp_path):
    """The tiny model's weights are 1.6 MiB: on a 1 MiB disk both verbs know it before they merge a tensor."""
    from llmfast.testing import build_tiny_llama

    other = build_tiny_llama(tmp_path / "other", seed=1)
    (tmp_path / "merge.yaml").write_text(f"merge_method: linear\nmodels:\n  - model: {tiny_dir}\n"
                                         f"    parameters: {{weight: 0.5}}\n  - model: {other}\n"
                                         f"    parameters: {{weight: 0.5}}\ndtype: float32\n")
    disk = small_disk("1M")
    for name, args in [("m", ["merge", str(tmp_path / "merge.yaml"), str(disk / "m")]),
                       ("exp", ["export", str(trained_adapter), str(disk / "exp")])]:
        code, _, err = run_cli(*args)
        assert code == 2 and err.strip().splitlines()[-1] == (
            f"llmfast: error: {disk / name}: needs about 1.6 MiB and the device of {disk} has 1.0 MiB free: free "
            "some space there (or write elsewhere) and run again"), err[-2000:]
        assert "merge (linear)" not in err and _contents(disk) == []


def test_sparsify_and_quantize_are_refused_before_their_work_where_the_disk_is_too_small(small_disk, tiny_dir,
                                                                                          tmp_path):
    """What the output takes at the least is known from the shapes before the model loads: NF4 weights at 4 bits
    (0.4 MiB of the tiny model), relufy's new weights in float32 (1.6 MiB) and TEAL's copy of the source's files
    across file systems (1.7 MiB)."""
    text = Path(__file__).parent.parent / "eval" / "text" / "persuasion.txt"
    data = f"data: {{text: {text}, skip_tokens: 2048, calibration_tokens: 1024, heldout_tokens: 512, window: 128}}\n"
    (tmp_path / "teal.yaml").write_text(f"model: {tiny_dir}\nsparsify: {{method: teal, config: {{target: 0.5}}}}\n"
                                        + data)
    (tmp_path / "relufy.yaml").write_text(f"model: {tiny_dir}\nsparsify: {{method: relufy, config: {{steps: 2}}}}\n"
                                          + data)
    (tmp_path / "nf4.yaml").write_text(f"model: {tiny_dir}\nquantization: {{method: bnb4, type: nf4}}\n")
    for verb, name, size, need in [("sparsify", "teal", "1M", "1.7"), ("sparsify", "relufy", "1M", "1.6"),
                                   ("quantize", "nf4", "200K", "0.4")]:
        disk = small_disk(size)
        code, _, err = run_cli(verb, str(tmp_path / f"{name}.yaml"), "--set", f"output={disk / name}")
        assert code == 2 and err.strip().splitlines()[-1] == (
            f"llmfast: error: {disk / name}: needs at least {need} MiB and the device of {disk} has "
            f"{'1.0' if size == '1M' else '0.2'} MiB free: free some space there (or write elsewhere) and run "
            "again"), err[-2000:]
        assert "Loading weights" not in err and _contents(disk) == [], (name, _contents(disk))


def test_the_quantize_floor_is_under_what_each_method_writes(tmp_path, tiny_dir):
    """The up-front check counts a floor; were it above a real artifact, a disk that holds the output would be
    refused. Against the files written: NF4 and ternary of the tiny Llama (float32), NF4 of a GPT-2 in bfloat16
    (whose Conv1D layers bnb4 quantizes as it does Linear ones)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from llmfast.quant.base import least_bytes
    from llmfast.quant.run import skeleton

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=128, n_head=2, vocab_size=1024)).save_pretrained(gpt2)
    for f in tiny_dir.glob("tokenizer*"):
        (gpt2 / f.name).write_bytes(f.read_bytes())
    text = Path(__file__).parent.parent / "eval" / "text" / "persuasion.txt"
    for name, model, quant, dtype, bits in [
            ("nf4", tiny_dir, "{method: bnb4, type: nf4}", "float32", 4),
            ("ternary", tiny_dir, "{method: bitnet, qat_steps: 0}", "float32", 2),
            ("gpt2-nf4", gpt2, "{method: bnb4, type: nf4}", "bfloat16", 4)]:
        data = (f"data: {{text: {text}, skip_tokens: 1024, heldout_tokens: 256, calibration_tokens: 512, "
                f"window: 128}}\n"
                if "bitnet" in quant else "")
        (tmp_path / f"{name}.yaml").write_text(f"model: {model}\nquantization: {quant}\n{data}dtype: {dtype}\n"
                                               f"output: {tmp_path / name}\n")
        code, _, err = run_cli("quantize", str(tmp_path / f"{name}.yaml"))
        assert code == 0, err[-2000:]
        written = sum(f.stat().st_size for f in (tmp_path / name).iterdir())
        floor = least_bytes(skeleton(model), bits)
        assert 0.4 * written < floor <= written, (name, floor, written)


def test_quantize_on_a_disk_that_fills_while_it_writes_leaves_nothing(small_disk, tiny_dir, tmp_path):
    """Room for the floor the check counts (0.4 MiB), not for the artifact (0.7 MiB): NF4's safetensors write
    fails (its Rust I/O error), and the line names the output, whose temporary sibling is gone."""
    (tmp_path / "nf4.yaml").write_text(f"model: {tiny_dir}\nquantization: {{method: bnb4, type: nf4}}\n")
    disk = small_disk("600K")
    code, _, err = run_cli("quantize", str(tmp_path / "nf4.yaml"), "--set", f"output={disk / 'q'}")
    _refused(code, err, disk, "q")
    assert "nothing of q was kept" in err and _contents(disk) == [], _contents(disk)


def test_finetune_on_a_full_disk_stops_at_its_checkpoint_or_log_line(small_disk, trained_adapter):
    """A checkpoint that does not fit: refused by name, nothing of it left. A log line that does not
    fit (the disk filled by another file): refused by name, and the log cut back to whole lines, so `--resume`
    after freeing space reads it (it refuses a line that is not llmfast's)."""
    if os.sysconf("SC_PAGE_SIZE") != 4096:
        pytest.skip("the sizes below count 4 KiB pages")
    recipe = trained_adapter.parent.parent / "r.yaml"
    disk = small_disk("40K")
    text = recipe.read_text().replace("steps: 2,", "steps: 4, save_every: 2,")
    (disk.parent / "ckpt.yaml").write_text(text.replace(str(trained_adapter.parent), str(disk / "ft")))
    code, _, err = run_cli("finetune", str(disk.parent / "ckpt.yaml"))
    _refused(code, err, disk / "ft" / "checkpoints", "step-000002")
    # the run's folder as a kill before its first checkpoint leaves it (which `--resume` starts again from)
    assert _contents(disk) == ["ft", "ft/base.json", "ft/checkpoints", "ft/encoded", "ft/encoded/examples.npy",
                               "ft/encoded/ids.npy", "ft/encoded/labels.npy", "ft/encoded/meta.json", "ft/recipe.json",
                               "ft/train_log.jsonl"]
    shutil.rmtree(disk / "ft")
    # under torchrun, process 0's line alone: process 1, waiting for it at a barrier, added gloo's 'Connection closed
    # by peer' traceback (s47)
    p = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "-m", "llmfast.cli",
                        "finetune", str(disk.parent / "ckpt.yaml")], capture_output=True, text=True, timeout=300)
    said = [line for line in p.stderr.splitlines()
            if line.startswith(("llmfast:", "[rank")) and not line.startswith("llmfast: data: ")]
    assert p.returncode != 0 and len(said) == 1, said[:8]
    assert p.stderr.count("llmfast: data: ") == 1  # what it read, said by process 0 alone
    assert said[0].startswith(f"llmfast: error: no space left on the device of {disk / 'ft' / 'checkpoints'}"), said
    shutil.rmtree(disk / "ft")

    # 28 KB left: the recipe's copy, base.json, the encoded rows' four files (a page each), one page of log lines
    (disk / "filler").write_bytes(bytes(12288))
    text = recipe.read_text().replace("steps: 2,", "steps: 80, log_every: 1,")
    (disk.parent / "log.yaml").write_text(text.replace(str(trained_adapter.parent), str(disk / "ft")))
    code, _, err = run_cli("finetune", str(disk.parent / "log.yaml"))
    _refused(code, err, disk / "ft", "train_log.jsonl")
    log = (disk / "ft" / "train_log.jsonl").read_text()
    assert log.endswith("\n") and 10 < len(log.splitlines()) < 80
    assert [json.loads(line)["step"] for line in log.splitlines()] == list(range(1, len(log.splitlines()) + 1))
    (disk / "filler").unlink()
    subprocess.run(["mount", "-o", "remount,size=4M", str(disk)], check=True)  # room for the adapter too
    code, _, err = run_cli("finetune", str(disk.parent / "log.yaml"), "--resume")  # no checkpoint: starts again
    assert code == 0, err[-2000:]
    assert len((disk / "ft" / "train_log.jsonl").read_text().splitlines()) == 80


def test_tasks_on_a_full_disk_remove_the_files_and_folders_they_made(small_disk):
    """dates' two files fit, extract's train file does not: all three taken back, with the folders made for them."""
    disk = small_disk("1M")
    code, _, err = run_cli("tasks", "dates", "extract", "--train", "4000", "--out", str(disk / "t"))
    _refused(code, err, disk / "t" / "extract", "train.jsonl")
    assert "train.jsonl was not written" in err and _contents(disk) == []


def test_torch_save_on_a_full_disk_is_recognised(small_disk):
    """torch.save's own error on a full disk says nothing of it ("unexpected pos ..." from its C++ writer): inside
    an atomic output it is told by its message and the space left. Other errors on a full disk keep theirs."""
    import torch

    from llmfast.artifacts import append_line, atomic_dir
    from llmfast.errors import UserError

    disk = small_disk("64K")
    with pytest.raises(UserError, match=rf"no space left on the device of {disk} while writing out: .*nothing of "
                                        r"out was kept"):
        with atomic_dir(disk / "out") as tmp:
            torch.save({"w": torch.zeros(100_000)}, tmp / "w.pt")
    assert _contents(disk) == []
    (disk / "filler").write_bytes(bytes(60 * 1024))  # the disk full again: other errors keep their own
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        with atomic_dir(disk / "out"):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(UserError, match=r"while writing log.jsonl: .*--resume continues"):
        with atomic_dir(disk / "out"):  # a log line inside an atomic output (distill's): the log's message stays
            append_line(disk / "log.jsonl", "x" * 10_000)
    assert _contents(disk) == ["filler", "log.jsonl"] and (disk / "log.jsonl").read_bytes() == b""


def test_no_space_reads_the_errors_libraries_raise():
    from llmfast.errors import no_space

    assert no_space(OSError(errno.ENOSPC, "No space left on device"))
    assert no_space(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert no_space(RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"))
    try:
        try:
            raise OSError(errno.ENOSPC, "full")
        except OSError as inner:
            raise RuntimeError("writing failed") from inner
    except RuntimeError as outer:
        assert no_space(outer)
    assert not no_space(OSError(errno.EACCES, "Permission denied"))
    assert not no_space(RuntimeError("unexpected pos 576 vs 534"))


def test_a_read_only_cache_is_refused_before_the_conversion(small_disk, monkeypatch):
    """The built-in model's conversion (~20 s) into a cache that cannot be written: refused up front, naming it (it
    failed at the save, after the conversion). A read-only mount: root ignores permission bits, not that."""
    from llmfast.models import BUILTINS, builtin_gguf_path

    ro = small_disk("64K")
    subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
    monkeypatch.setenv("LLMFAST_CACHE", str(ro / "cache"))
    assert builtin_gguf_path(BUILTINS["smollm2-135m"]).is_file()
    code, _, err = run_cli("models", "--prepare", "builtin:smollm2-135m")
    assert code == 2 and err.strip().splitlines()[-1].startswith(
        f"llmfast: error: llmfast's cache {ro / 'cache'} cannot hold the converted model (output {ro / 'cache'}"), err
    assert "converting" not in err, err  # refused before the converter's progress bar


def test_a_full_disk_outside_an_output_names_the_folder_it_was_writing(tmp_path, monkeypatch):
    from llmfast.errors import UserError, as_user_error

    monkeypatch.chdir(tmp_path)
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "cache.bin")  # a bare name: the working folder
        except OSError as inner:
            raise RuntimeError("could not write the cache") from inner
    except RuntimeError as outer:
        err = as_user_error(outer)
    assert isinstance(err, UserError) and str(err) == (
        f"no space left on the device of {tmp_path}: free some space there (or write elsewhere) and run again")
    assert as_user_error(RuntimeError("a bug")) is None


def test_safetensors_on_a_full_disk_is_told_by_the_space_left(small_disk):
    """safetensors' error on a full disk names no file ("Error while serializing: ... os error 28"): inside an atomic
    output it is that output's full disk when its file system has no space left (s46's mutation audit: without
    that fallback the line named no folder and no output)."""
    import torch
    from safetensors.torch import save_file

    from llmfast.artifacts import atomic_dir
    from llmfast.errors import UserError

    disk = small_disk("64K")
    with pytest.raises(UserError, match=rf"no space left on the device of {disk} while writing out: free some space "
                                        r"there \(or write elsewhere\) and run again; nothing of out was kept"):
        with atomic_dir(disk / "out") as tmp:
            save_file({"w": torch.zeros(100_000)}, tmp / "model.safetensors")
    assert _contents(disk) == []
