"""The llmfast cache's location and the C-kernel build cache (llmfast/cache.py, llmfast/native.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from llmfast import native
from llmfast.cache import cache_dir


def test_an_empty_cache_variable_is_the_default_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """`LLMFAST_CACHE= llmfast ...` (set, empty) is the shell's way to unset it: the default cache, not a refusal of
    a relative path '' (s46's mutation audit)."""
    monkeypatch.setenv("LLMFAST_CACHE", "")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == Path.home() / ".cache" / "llmfast"


def test_the_default_cache_follows_xdg_cache_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A user who moved their caches (XDG_CACHE_HOME) off a small home folder: llmfast's goes there too; a relative
    value is ignored, as the XDG spec says; LLMFAST_CACHE still wins."""
    monkeypatch.delenv("LLMFAST_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "llmfast"
    monkeypatch.setenv("XDG_CACHE_HOME", "rel/cache")
    assert cache_dir() == Path.home() / ".cache" / "llmfast"
    monkeypatch.setenv("LLMFAST_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler here")
def test_a_kernel_is_cached_per_cpu_source_and_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A home folder shared by machines of different CPUs must not load a library built with another's -march=native:
    the cached file's name changes with the CPU's flags, the source and the extra flags, and is reused otherwise
    (s46's mutation audit: a key without the CPU's flags passed every test)."""
    monkeypatch.setenv("LLMFAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LLMFAST_NATIVE", raising=False)
    source = tmp_path / "answer.c"
    source.write_text("int answer(void) { return 42; }\n")
    load = native.load_kernel.__wrapped__  # past the per-process lru_cache: each call looks in the cache folder
    built = lambda: sorted(p.name for p in (tmp_path / "cache" / "kernels").glob("answer-*.so"))  # noqa: E731

    monkeypatch.setattr(native, "_cpu_flags", lambda: "flags : fpu sse2 avx2")
    assert load(source).answer() == 42
    first = built()
    assert len(first) == 1
    assert load(source).answer() == 42 and built() == first  # the same CPU, source and flags: reused
    monkeypatch.setattr(native, "_cpu_flags", lambda: "flags : fpu sse2 avx2 avx512f")
    assert load(source).answer() == 42 and len(built()) == 2
    assert load(source, ("-O1",)).answer() == 42 and len(built()) == 3
    source.write_text("int answer(void) { return 43; }\n")
    assert load(source).answer() == 43 and len(built()) == 4


def test_a_tensor_missing_from_weights_named_without_the_models_prefix_is_refused(tiny_dir: Path,
                                                                                  tmp_path: Path) -> None:
    """Weights saved from the bare decoder (`layers.0...`, no `model.` prefix) pass the header check, which compares
    names only where the file names its tensors as the model does; transformers adds the prefix, loads, and fills a
    missing tensor at random: loading's own check of transformers' missing keys refuses it (s46's mutation audit:
    dropping that check passed every test)."""
    from safetensors.torch import load_file, save_file

    from llmfast.errors import UserError
    from llmfast.loading import from_pretrained

    copy = tmp_path / "bare"
    shutil.copytree(tiny_dir, copy)
    tensors = load_file(tiny_dir / "model.safetensors")
    bare = {k.removeprefix("model."): v for k, v in tensors.items()}
    save_file(bare, copy / "model.safetensors", metadata={"format": "pt"})
    assert sum(p.numel() for p in from_pretrained(copy, "float32").parameters()) > 0  # whole: loads
    del bare["layers.0.mlp.up_proj.weight"]
    save_file(bare, copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=rf"{copy}: 1 tensor\(s\) its config needs are missing "
                                        r"\(model\.layers\.0\.mlp\.up_proj\.weight\): the weights are incomplete"):
        from_pretrained(copy, "float32")


def test_a_cc_that_is_no_command_line_keeps_the_torch_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """`CC='gcc "'` (an unbalanced quote) was a ValueError traceback from shlex in the middle of a merge or a
    sparsify run; like a missing compiler, it is said on stderr and the torch path runs (s46's mutation audit)."""
    monkeypatch.setenv("LLMFAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LLMFAST_NATIVE", raising=False)
    monkeypatch.setenv("CC", 'gcc "')
    source = tmp_path / "answer.c"
    source.write_text("int answer(void) { return 42; }\n")
    assert native.load_kernel.__wrapped__(source) is None
    err = capsys.readouterr().err
    assert "llmfast: $CC 'gcc \"' is not a command line (No closing quotation)" in err
    assert "answer runs on its slower torch path" in err and not (tmp_path / "cache").exists()
