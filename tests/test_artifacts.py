import json
import re
from pathlib import Path

import pytest

from llmfast.artifacts import atomic_dir, atomic_write_json, read_manifest, write_manifest
from llmfast.errors import UserError


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir())


def test_atomic_dir_renames_complete_directory(tmp_path):
    final = tmp_path / "model"
    with atomic_dir(final) as tmp:
        assert tmp.parent == tmp_path and tmp != final
        (tmp / "weights.bin").write_text("w")
        assert not final.exists()  # nothing visible until the block succeeds
    assert (final / "weights.bin").read_text() == "w"
    assert _siblings(final) == ["model"]


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "model"
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "half.bin").write_text("partial")
            raise RuntimeError("crash mid-write")
    assert not final.exists()
    assert _siblings(final) == []


def test_atomic_dir_replaces_existing_and_keeps_old_on_failure(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(final, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise KeyboardInterrupt
    assert (final / "old.txt").read_text() == "old"
    with atomic_dir(final, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert _siblings(final) == ["model"]


def test_atomic_dir_refuses_existing_without_overwrite(tmp_path):
    (tmp_path / "model").mkdir()
    with pytest.raises(UserError, match="already exists"):
        with atomic_dir(tmp_path / "model"):  # refusing is the default
            pass


def test_atomic_dir_refuses_an_output_that_is_or_holds_an_input(tmp_path):
    src = tmp_path / "runs" / "adapter"
    src.mkdir(parents=True)
    for out in (src, tmp_path / "runs"):
        with pytest.raises(UserError, match="is \\(or holds\\) the input"):
            with atomic_dir(out, overwrite=True, inputs=[src]):
                pass
    assert src.is_dir()


def test_atomic_dir_removes_temporaries_of_dead_writers_only(tmp_path):
    import os
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a PID that has exited
    (tmp_path / f".model.tmp-{dead}-abc").mkdir()
    (tmp_path / f".model.old-{dead}-def").mkdir()
    alive = tmp_path / f".model.tmp-{os.getppid()}-ghi"  # our parent is alive: maybe writing right now
    alive.mkdir()
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "x").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model", alive.name])


def test_manifest_round_trip(tmp_path):
    write_manifest(tmp_path, stage="finetune", parents=["builtin:smollm2-135m"], recipe={"lr": 2e-4},
                   metrics={"loss": 1.5})
    m = read_manifest(tmp_path)
    assert m["stage"] == "finetune" and m["parents"] == ["builtin:smollm2-135m"]
    assert m["recipe"] == {"lr": 2e-4} and m["metrics"] == {"loss": 1.5}
    assert "created" in m and "llmfast_version" in m
    assert read_manifest(tmp_path / "nothing") is None


def test_corrupt_manifest_is_a_user_error(tmp_path):
    (tmp_path / "llmfast.json").write_text("{not json")
    with pytest.raises(UserError, match=r"llmfast.json: not valid JSON"):
        read_manifest(tmp_path)


def test_atomic_write_json_is_readable(tmp_path):
    path = atomic_write_json(tmp_path / "sub" / "r.json", {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    assert _siblings(path) == ["r.json"]


def test_overwrite_replaces_only_an_llmfast_output(tmp_path):
    """`--overwrite` deleted whatever folder was named, a user's folder of other work included (`output: runs` for
    `runs/w4`; found by hand, s42): a user's output (`guard`) is replaced only when llmfast made it."""
    from llmfast.artifacts import MANIFEST, atomic_dir
    from llmfast.errors import UserError

    runs = tmp_path / "runs"
    (runs / "other").mkdir(parents=True)
    (runs / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=rf"output {runs} holds files llmfast did not write \(no llmfast.json\): "
                                        "--overwrite replaces only an llmfast output"):
        with atomic_dir(runs, overwrite=True, guard=True) as tmp:
            (tmp / "w").write_text("new")
    assert (runs / "notes.txt").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["runs"]
    made = tmp_path / "made"
    made.mkdir()
    (made / MANIFEST).write_text("{}")
    with atomic_dir(made, overwrite=True, guard=True) as tmp:
        (tmp / "w").write_text("new")
    assert sorted(p.name for p in made.iterdir()) == ["w"]
    (tmp_path / "empty").mkdir()
    with atomic_dir(tmp_path / "empty", overwrite=True, guard=True) as tmp:
        (tmp / "w").write_text("new")
    assert (tmp_path / "empty" / "w").exists()


def test_checkpoints_past_a_million_steps_keep_their_order(tmp_path):
    """`step-1000000` sorted before `step-999999` as text: each new checkpoint was pruned as the oldest once
    written, and `--resume` went back to step 999,999 (s43's review). Steps are compared as numbers."""
    import torch

    from llmfast import distill
    from llmfast.finetune import checkpoint

    work = tmp_path / "w"
    student = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(student.parameters())
    settings = distill.DistillSettings(steps=2_000_000)
    for step in (999_998, 999_999, 1_000_000, 1_000_001):
        distill.save_checkpoint(work, student, optimizer, step, settings, keep=2)
    names = [p.name for p in (work / "checkpoints").iterdir()]
    assert sorted(names) == ["step-1000000", "step-1000001"], names
    assert distill.latest_checkpoint(work).name == "step-1000001"
    assert checkpoint.latest_checkpoint(work).name == "step-1000001"  # finetune's, same folder layout


def test_an_output_that_appears_while_writing_is_left_as_it_is(tmp_path):
    """Another process (or the user) making the output folder during a run: its files stay, ours are dropped
    (s44's mutation audit: without the check it was moved aside and deleted)."""
    final = tmp_path / "out"
    with pytest.raises(UserError, match=rf"output {final} appeared while writing it: left as it is"):
        with atomic_dir(final) as tmp:
            (tmp / "ours.txt").write_text("ours")
            final.mkdir()
            (final / "user.txt").write_text("mine")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in final.iterdir()] == ["user.txt"]
    assert (final / "user.txt").read_text() == "mine"


def test_an_output_that_is_the_current_folder_or_above_it_is_refused(tmp_path, monkeypatch):
    """`output: ..` would be replaced whole by --overwrite (s46's mutation audit: only `.` was tested)."""
    from llmfast.artifacts import check_output

    here = tmp_path / "a" / "b"
    here.mkdir(parents=True)
    monkeypatch.chdir(here)
    for given in (".", "..", str(tmp_path)):
        with pytest.raises(UserError, match=rf"output '{re.escape(given)}' is empty, the current folder or a folder "
                                            "above it: name a new directory"):
            check_output(given, overwrite=True)
    assert check_output("new") == Path("new")


def test_an_output_name_may_take_200_bytes_and_no_more(tmp_path):
    """Counted in bytes (é is two), as the file system counts its 255 (s46's mutation audit: no edge was tested)."""
    from llmfast.artifacts import MAX_OUTPUT_NAME, check_output

    assert MAX_OUTPUT_NAME == 200
    assert check_output(tmp_path / ("é" * 100)) == tmp_path / ("é" * 100)
    with pytest.raises(UserError, match=rf"its name is 201 bytes, .*choose a name of at most 200 bytes"):
        check_output(tmp_path / ("é" * 100 + "x"))


def test_an_output_path_of_bytes_that_are_not_utf8_is_one_line_and_nothing_is_written(tmp_path):
    """`export ADAPTER $'e\\xe9'` wrote the merged weights, then the tokenizers library could not save under that path:
    a UnicodeEncodeError traceback; `tasks --out` one from the output's name length check (s50's encodings audit)."""
    import os
    import subprocess
    import sys

    out = os.fsdecode(os.fsencode(tmp_path) + b"/t\xe9")
    p = subprocess.run([sys.executable, "-m", "llmfast", "tasks", "dates", "--out", out], capture_output=True,
                       text=True, errors="backslashreplace")
    assert p.returncode == 2 and p.stderr.strip() == (
        f"llmfast: error: output {tmp_path}/t\\xe9: its path holds bytes that are not UTF-8 text (tokenizer files "
        "cannot be saved there): choose a name in UTF-8"), p.stderr
    assert os.listdir(tmp_path) == []


def test_a_link_to_nothing_is_refused_as_an_output(tmp_path):
    """A dangling link does not `exist`, so without its own check the new artifact replaced the link silently."""
    from llmfast.artifacts import check_output

    (tmp_path / "out").symlink_to(tmp_path / "gone")
    with pytest.raises(UserError, match=rf"output {tmp_path / 'out'} is a symbolic link to {tmp_path / 'gone'}, "
                                        "which does not exist: remove the link"):
        check_output(tmp_path / "out")
    assert (tmp_path / "out").is_symlink() and not (tmp_path / "gone").exists()


def test_artifacts_and_written_files_get_the_umasks_modes(tmp_path):
    """mkdtemp and mkstemp make private (0700/0600) entries: an artifact must be an ordinary folder another user of
    a shared machine can read (s46's mutation audit: the chmods were untested)."""
    import os
    import stat

    import torch
    from safetensors.torch import save_file

    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "model") as tmp:
            (tmp / "w").write_text("w")
            save_file({"x": torch.zeros(2)}, tmp / "model.safetensors")  # safetensors 0.8 writes it 0600
            (tmp / "sub").mkdir()
            save_file({"x": torch.zeros(2)}, tmp / "sub" / "adapter.safetensors")
        written = atomic_write_json(tmp_path / "r.json", {"a": 1})
        os.umask(0o027)
        group = atomic_write_json(tmp_path / "g.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o755
    for f in ("w", "model.safetensors", "sub/adapter.safetensors"):  # readable by the others, as the umask says
        assert stat.S_IMODE((tmp_path / "model" / f).stat().st_mode) == 0o644, f
    assert stat.S_IMODE(written.stat().st_mode) == 0o644 and stat.S_IMODE(group.stat().st_mode) == 0o640


def test_a_failed_text_write_leaves_the_old_file_and_no_temporary(tmp_path):
    from llmfast.artifacts import atomic_write_text

    path = tmp_path / "r.json"
    path.write_text("old")
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(path, "half \ud800 written")  # a lone surrogate cannot be encoded: fails mid-write
    assert path.read_text() == "old" and _siblings(path) == ["r.json"]


def test_a_work_folder_that_is_a_link_or_a_file_is_refused(tmp_path):
    """Starting afresh removes OUTPUT.checkpoints: a link there (to a user's folder) or a file is not llmfast's."""
    from llmfast.work_dir import check_work_dir

    (tmp_path / "mine").mkdir()
    (tmp_path / "out.checkpoints").symlink_to(tmp_path / "mine")
    (tmp_path / "file.checkpoints").write_text("x")
    for work in (tmp_path / "out.checkpoints", tmp_path / "file.checkpoints"):
        with pytest.raises(UserError, match=rf"{work} is not a folder llmfast made \(a link or a file\): move it away"):
            check_work_dir(work)
    check_work_dir(tmp_path / "none.checkpoints")  # not there yet: fine


def test_a_failed_run_removes_a_work_folder_holding_only_its_mark_and_keeps_checkpoints(tmp_path):
    """A refused setting leaves nothing beside the output; an interrupted run keeps its checkpoints for --resume."""
    from llmfast.work_dir import WORK_MARK, marked_work_dir

    work = tmp_path / "out.checkpoints"
    with pytest.raises(ValueError):
        with marked_work_dir(work, {"method": "x"}):
            assert (work / WORK_MARK).is_file()
            raise ValueError("refused")
    assert not work.exists()
    with pytest.raises(KeyboardInterrupt):
        with marked_work_dir(work, {"method": "x"}):
            (work / "step-1").mkdir()
            raise KeyboardInterrupt
    assert sorted(p.name for p in work.iterdir()) == [WORK_MARK, "step-1"]
    assert json.loads((work / WORK_MARK).read_text()) == {"run": {"method": "x"}}


def test_a_manifest_that_is_not_an_object_is_one_line_and_older_forms_still_read(tmp_path):
    """A list in llmfast.json was an AttributeError traceback without the check; `quantization: true`, what older
    versions wrote, is still read (s46's mutation audit)."""
    (tmp_path / "llmfast.json").write_text("[1, 2]")
    with pytest.raises(UserError, match=r"llmfast\.json: a manifest is a JSON object, this is a list: delete or fix"):
        read_manifest(tmp_path)
    (tmp_path / "llmfast.json").write_text('{"stage": "quantize", "quantization": true}')
    assert read_manifest(tmp_path)["quantization"] is True
    (tmp_path / "llmfast.json").write_text('{"stage": "quantize", "quantization": "w4"}')
    with pytest.raises(UserError, match=r"quantization must be a JSON object, not str: rebuild the artifact"):
        read_manifest(tmp_path)


def test_a_local_parent_is_recorded_absolute_and_a_builtin_as_given(tmp_path, monkeypatch):
    """Lineage written from a relative path is found from any folder (`merge` compares an adapter's recorded parent
    with the base it is given)."""
    (tmp_path / "base").mkdir()
    monkeypatch.chdir(tmp_path)
    write_manifest(tmp_path / "art", stage="export", parents=["base", "./base/../base", "builtin:smollm2-135m"])
    assert read_manifest(tmp_path / "art")["parents"] == [str(tmp_path / "base")] * 2 + ["builtin:smollm2-135m"]


def test_a_pipe_or_device_at_the_output_is_refused_even_with_overwrite(tmp_path):
    """A FIFO (or a device: `output: /dev/null`) passed the check for a regular file, and --overwrite moved it aside
    and deleted it to put the artifact there (as root, /dev/null itself; s46's mutation audit)."""
    import os
    import stat

    fifo = tmp_path / "out"
    os.mkfifo(fifo)
    for overwrite in (False, True):
        with pytest.raises(UserError, match=rf"output {fifo} is a pipe, a socket or a device, not a directory: "
                                            "choose a directory path"):
            with atomic_dir(fifo, overwrite=overwrite, guard=True) as tmp:
                (tmp / "w").write_text("new")
    assert stat.S_ISFIFO(fifo.lstat().st_mode) and _siblings(fifo) == ["out"]
    (tmp_path / "file").write_text("mine")
    with pytest.raises(UserError, match=rf"output {tmp_path / 'file'} is a file, not a directory"):
        with atomic_dir(tmp_path / "file", overwrite=True):
            pass
    assert (tmp_path / "file").read_text() == "mine"


def test_a_signal_between_the_two_renames_of_an_overwrite_keeps_the_old_artifact(tmp_path, monkeypatch):
    """--overwrite moves the old artifact aside, then renames the new one into place: a Ctrl-C (or SIGTERM) between
    the two left neither, the old one in a `.old-` sibling a later run deletes (s46's mutation audit). The rename
    of the new one is interrupted here; the old artifact is back, whole, and nothing is left beside it."""
    import os

    final = tmp_path / "model"
    final.mkdir()
    (final / "old.txt").write_text("old")
    real = os.replace

    def interrupted(src, dst):
        if Path(src).name.startswith(".model.tmp-"):
            raise KeyboardInterrupt
        real(src, dst)

    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(final, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            monkeypatch.setattr(os, "replace", interrupted)
    monkeypatch.undo()
    assert [p.name for p in final.iterdir()] == ["old.txt"] and _siblings(final) == ["model"]


def test_an_output_through_a_link_that_loops_is_one_line(tmp_path):
    """A link that points to itself on the output's path: Path.resolve raised RuntimeError ("Symlink loop"), a
    traceback from every verb that writes an artifact (s46's mutation audit)."""
    from llmfast.artifacts import check_output

    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    for out in (tmp_path / "loop", tmp_path / "loop" / "run"):
        with pytest.raises(UserError, match=rf"output {out} goes through a symbolic link that loops back to itself: "
                                            "remove or fix the link, or choose another path"):
            check_output(out, overwrite=True)
    assert (tmp_path / "loop").is_symlink()


def test_resume_compares_the_marked_run_and_passes_over_what_older_marks_lack(tmp_path):
    """check_resumed_run: other settings or other weights are refused naming what differs; the same weights at
    another path continue; a mark of an earlier version (no weights recorded, or no run object) is not compared
    (s46's mutation audit: those two edges were untested)."""
    from llmfast.work_dir import WORK_MARK, check_resumed_run

    work = tmp_path / "out.checkpoints"
    work.mkdir()
    run = {"verb": "sparsify", "model": "/models/a", "settings": {"x": 1, "y": 2}, "weights": "w1"}

    def marked(recorded):
        (work / WORK_MARK).write_text(json.dumps({"run": recorded}))

    marked({"verb": "sparsify", "model": "/models/a", "settings": {"x": 1, "y": 2}})  # no weights: older version
    check_resumed_run(work, run)
    marked(["not", "an", "object"])
    check_resumed_run(work, run)
    marked({**run, "model": "/moved/a"})  # the same weights elsewhere
    check_resumed_run(work, run)
    marked({**run, "weights": "w0"})
    with pytest.raises(UserError, match=r"holds a run on other weights than those of /models/a now"):
        check_resumed_run(work, run)
    marked({**run, "settings": {"x": 1, "y": 3}})
    with pytest.raises(UserError, match=r"holds a run with settings\.y 3, this one has 2: resume with the same recipe"):
        check_resumed_run(work, run)


def test_json_the_kit_writes_is_strict_json(tmp_path: Path) -> None:
    """A perplexity of inf or a NaN rate became `Infinity` / `NaN` in results and manifests: Python reads them back,
    jq and JavaScript refuse the whole file. Written as null, at any depth, other values untouched."""
    import math

    import numpy as np

    def strict(text: str) -> object:
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))

    data = {"ppl": math.inf, "rows": [1, -math.inf, {"rate": float("nan"), "ok": 2.5}], "np": np.float64("nan"),
            "pair": (math.nan, "x"), "flag": True, "none": None}
    assert strict(atomic_write_json(tmp_path / "r.json", data).read_text()) == {
        "ppl": None, "rows": [1, None, {"rate": None, "ok": 2.5}], "np": None, "pair": [None, "x"], "flag": True,
        "none": None}
