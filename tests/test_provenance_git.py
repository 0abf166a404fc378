"""Provenance says whether the checkout that ran had uncommitted changes (provenance.git_dirty): `git status` on the
tracked files, once a process, never failing the run; absent outside a git checkout or without git."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO
from llmfast.provenance import describe, git_dirty, provenance

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git makes the checkouts read here")


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main", *args],
                          cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def _repo(path: Path) -> Path:
    path.mkdir()
    _git(path, "init", "-q")
    (path / "f").write_text("1")
    _git(path, "add", "f")
    _git(path, "commit", "-qm", "one")
    return path


def test_dirty_is_whether_tracked_files_differ_from_the_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Clean (an untracked file is no change) -> False; a modified tracked file, staged or not -> True, for the
    checkout asked about even where a hook's GIT_DIR names another; not a checkout, or no commit yet -> None."""
    clean, changed, staged = _repo(tmp_path / "clean"), _repo(tmp_path / "changed"), _repo(tmp_path / "staged")
    (clean / "untracked").write_text("x")
    (changed / "f").write_text("2")
    (staged / "f").write_text("2")
    _git(staged, "add", "f")
    monkeypatch.setenv("GIT_DIR", str(staged / ".git"))  # its index differs from its commit
    assert git_dirty(clean) is False
    monkeypatch.delenv("GIT_DIR")
    assert git_dirty(changed) is True and git_dirty(staged) is True
    (changed / "f").write_text("1")
    assert git_dirty(changed) is True  # asked once a process: a run's records all say what it started from
    assert git_dirty(tmp_path) is None
    (tmp_path / "unborn").mkdir()
    _git(tmp_path / "unborn", "init", "-q")
    assert git_dirty(tmp_path / "unborn") is None


def test_without_git_the_flag_is_absent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = _repo(tmp_path / "repo")
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    assert git_dirty(repo) is None


def test_the_record_and_its_line_carry_it() -> None:
    """This checkout's record has git_dirty as `git status` says (absent where it is no checkout, as installed)."""
    p = provenance()
    if not (REPO / ".git").exists():
        assert "git_dirty" not in p
        return
    assert p["git_dirty"] is bool(_git(REPO, "status", "--porcelain", "--untracked-files=no"))
    assert ("with uncommitted changes" in describe(p)) is p["git_dirty"]
    assert "with uncommitted changes" in describe({**p, "git_dirty": True})
    assert "uncommitted" not in describe({**p, "git_dirty": False})
