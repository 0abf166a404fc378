"""Artifact directories: what a stage writes, with its lineage, and never half-written.

An artifact is a directory that Hugging Face tools open as it is (a model or a PEFT adapter) plus `llmfast.json`, the
manifest: which stage made it, from which parents, with which recipe, and its metrics. Every write goes to a temporary
sibling renamed into place only when complete: a crash or a Ctrl-C leaves the old artifact or the new, never a mix.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from llmfast import __version__
from llmfast.errors import UserError, error_filenames, no_space

MANIFEST = "llmfast.json"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


# Room for an output's siblings in 255 bytes: the temporary `.NAME.tmp-PID-XXXXXXXX` (22 more) of `NAME.checkpoints` (12)
MAX_OUTPUT_NAME = 200


def _temp_prefix(name: str, kind: str) -> str:
    # The owner's PID is in the name, so a later run can tell a dead process's leftovers from a live writer's.
    return f".{name}.{kind}-{os.getpid()}-"


def reap_stale_temps(final: str | os.PathLike[str]) -> list[Path]:
    """Delete temporary siblings of `final` left by processes that died (SIGKILL, power loss); return them.

    Siblings of live processes are left alone: another run may be writing the same output right now.
    """
    final = Path(final)
    removed: list[Path] = []
    if not final.parent.is_dir():
        return removed
    for kind in ("tmp", "old"):
        for p in final.parent.glob(f".{glob_escape(final.name)}.{kind}-*"):
            pid = p.name[len(f".{final.name}.{kind}-"):].split("-", 1)[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        p.unlink()
                removed.append(p)
    return removed


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def check_output(final: str | os.PathLike[str], overwrite: bool = False,
                 inputs: Iterable[str | os.PathLike[str] | None] = (), flag: str = "--overwrite") -> Path:
    """Refuse an output path that would lose a user's files; return it.

    An existing output is refused unless `overwrite`; an output that is one of the `inputs`, a folder holding one, or
    a folder inside an input folder, is refused always (replacing it would delete or change the input); so are an
    empty output, the current folder and those above it, and a path of bytes that are not UTF-8; a regular file where
    a directory is wanted, and a parent that cannot be created, are one-line errors too.
    """
    final = Path(final).expanduser()
    try:
        resolved = final.resolve()
    except (RuntimeError, OSError):  # a link that leads back to itself (Python 3.11 raises RuntimeError)
        raise UserError(f"output {final} goes through a symbolic link that loops back to itself: remove or fix the "
                        "link, or choose another path") from None
    if not str(final).strip() or resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents:
        raise UserError(f"output {str(final)!r} is empty, the current folder or a folder above it: name a new "
                        "directory for the output")
    for i in inputs:
        if i is None:
            continue
        src = Path(i).expanduser().resolve()
        if resolved == src or resolved in src.parents:
            raise UserError(f"output {final} is (or holds) the input {i}: writing it would destroy the input; "
                            "choose another output directory")
        if src.is_dir() and src in resolved.parents:
            raise UserError(f"output {final} is inside the input {i}: writing it would change the input; choose a "
                            "directory outside it")
    if any("\udc80" <= c <= "\udcff" for c in str(final)):  # undecodable bytes: tokenizers (Rust) cannot save there
        raise UserError(f"output {os.fsencode(final).decode('ascii', 'backslashreplace')}: its path holds bytes that "
                        "are not UTF-8 text (tokenizer files cannot be saved there): choose a name in UTF-8")
    if len(final.name.encode()) > MAX_OUTPUT_NAME:
        raise UserError(f"output {final}: its name is {len(final.name.encode())} bytes, and llmfast writes beside it "
                        f"under longer ones (.NAME.tmp-…, NAME.checkpoints) that must fit the file system's 255: "
                        f"choose a name of at most {MAX_OUTPUT_NAME} bytes")
    if final.is_symlink() and not final.exists():
        raise UserError(f"output {final} is a symbolic link to {os.readlink(final)}, which does not exist: remove the "
                        "link, or choose another path")
    if final.exists() and not final.is_dir():  # a pipe or a device too: --overwrite would move it aside and delete it
        what = "a file" if final.is_file() else "a pipe, a socket or a device"
        raise UserError(f"output {final} is {what}, not a directory: choose a directory path")
    if final.exists() and not overwrite:
        raise UserError(f"output {final} already exists: choose another path, or pass {flag} to replace it")
    check_writable_parent(final)
    return final


def nearest_existing(path: Path) -> Path:
    """`path`, or the nearest folder above it that exists (where an output not yet made will be)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_parent(path: Path) -> None:
    """The nearest existing folder above `path` is a folder we may write in; else one line naming it."""
    parent = nearest_existing(path.parent)
    if not parent.is_dir():
        raise UserError(f"output {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"output {path}: no permission to write in {parent}")


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike[str], overwrite: bool = False,
               inputs: Iterable[str | os.PathLike[str] | None] = (), guard: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `final`; rename it to `final` if the block succeeds, delete it if not.

    An existing `final` is refused unless `overwrite` (then replaced only once the new one is complete); with `guard`
    (a user's output), a folder that is not an llmfast output (no llmfast.json) is refused even then.
    Leftover temporary siblings of dead processes are removed first.
    """
    final = check_output(final, overwrite, inputs)
    if overwrite and guard and final.is_dir() and not final.is_symlink() and any(final.iterdir()) \
            and not (final / MANIFEST).is_file():  # a slip (`output: runs`) would delete a folder of other work
        raise UserError(f"output {final} holds files llmfast did not write (no {MANIFEST}): --overwrite replaces only "
                        "an llmfast output; choose another output, or remove it yourself")
    if overwrite and guard and final.is_symlink():
        raise UserError(f"output {final} is a symbolic link (to {os.readlink(final)}): --overwrite would replace the "
                        "link with a new folder and leave what it points to as it is; give that folder itself, or "
                        "another path")
    if overwrite and final.is_dir() and not final.is_symlink() and not os.access(final, os.W_OK | os.X_OK):
        # moving it aside (to replace it once the new one is complete) needs write permission on the folder itself
        raise UserError(f"output {final} is read-only, so --overwrite cannot replace it: make it writable (chmod u+w "
                        f"{final}), or choose another path")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        reap_stale_temps(final)
        # A sibling, so the rename stays on one filesystem and is atomic.
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(final.name, "tmp"), dir=final.parent))
    except OSError as e:
        raise UserError(f"cannot write {final}: {e.strerror or e}") from None
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; an artifact is an ordinary directory
        yield tmp
        _share_files(tmp)
        if final.exists():
            if not overwrite:  # appeared while we worked: never replace what we did not check
                raise UserError(f"output {final} appeared while writing it: left as it is")
            old = Path(tempfile.mkdtemp(prefix=_temp_prefix(final.name, "old"), dir=final.parent))
            os.replace(final, old / final.name)
            try:
                os.replace(tmp, final)
            except BaseException:  # a signal between the two renames: the old one back, never neither
                os.replace(old / final.name, final)
                old.rmdir()
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException as e:
        full = _filled(e, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise _disk_full(final, f"(or write elsewhere) and run again; nothing of {final.name} was kept") from e
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write a file through a temporary sibling and a rename (replacing an existing file: callers check first)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory: give a file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        reap_stale_temps(path)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path.name, "tmp"), dir=path.parent)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        full, state = _filled(e, Path(tmp)), "left as it was" if path.exists() else "not written"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if full:
            raise _disk_full(path, f"(or write elsewhere) and run again; {path.name} was {state}") from e
        raise
    return path


def check_space(final: str | os.PathLike[str], need: int, at_least: bool = False) -> None:
    """Refuse an output of about `need` bytes (`at_least`: of no fewer) where its file system has less free, before
    the work that makes it (a merge or export of a large model writes gigabytes after minutes of work). An
    --overwrite'n output counts in full: the old one is removed only once the new one is complete."""
    final = Path(final)
    known = _free_space(final.parent)
    if known is not None and need > known[1]:
        raise UserError(f"{final}: needs {'at least' if at_least else 'about'} {_size(need)} and the device of "
                        f"{known[0]} has {_size(known[1])} free: free some space there (or write elsewhere) and run "
                        "again")


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def append_line(path: Path, line: str) -> None:
    """Append `line` to the log `path` (train_log.jsonl). A full disk is one error naming the file, and the log is
    cut back to what it held, so no half line is left for `--resume` to refuse."""
    size = path.stat().st_size if path.is_file() else 0
    try:
        with path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")
    except OSError as e:
        if not no_space(e):
            raise
        with contextlib.suppress(OSError):
            os.truncate(path, size)
        raise _disk_full(path, "and run again (--resume continues from the last checkpoint)") from None


def _filled(e: BaseException, tmp: Path) -> bool:
    """Whether the write into `tmp` that raised `e` failed because that file system is full: an ENOSPC naming a file
    in `tmp` (or naming none, with the file system out of space), or torch.save's opaque writer error ("unexpected
    pos ...": its C++ stream says nothing of the disk) with the file system out of space. A UserError keeps its own
    message; an ENOSPC elsewhere (a cache under /tmp) is left to the CLI, which names its folder."""
    if isinstance(e, UserError):
        return False
    if no_space(e):
        named = [f for f in error_filenames(e) if f]
        inside = [Path(os.path.abspath(f)).is_relative_to(os.path.abspath(tmp)) for f in named]
        return any(inside) if named else _out_of_space(tmp)
    torch_writer = ("unexpected pos", "PytorchStreamWriter", "inline_container", "file write failed")
    return isinstance(e, RuntimeError) and any(m in str(e) for m in torch_writer) and _out_of_space(tmp)


def _out_of_space(tmp: Path) -> bool:
    known = _free_space(tmp)
    return known is not None and known[1] < 1 << 20


def _free_space(path: Path) -> tuple[Path, int] | None:
    """(the nearest existing folder at or above `path`, the bytes free on its file system), or None where that is
    not known (some FUSE mounts report no sizes at all: total 0)."""
    path = nearest_existing(path)
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    # root may write into the blocks the file system reserves for it (ext4: 5%); others may not
    free = (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize
    return (path, free) if st.f_blocks else None


def _disk_full(path: Path, then: str) -> UserError:
    """The one line for a write of `path` that found its disk full; `then`: what to do after freeing space."""
    return UserError(f"no space left on the device of {path.parent} while writing {path.name}: free some space there "
                     f"{then}")


def _share_files(folder: Path) -> None:
    """Give the folder's files the umask's modes: safetensors 0.8 writes its files 0600 (mkstemp and a rename), so
    model.safetensors of a saved model was private on a shared machine while the files beside it were not."""
    mode = 0o666 & ~_umask()
    for root, _dirs, files in os.walk(folder):
        for name in files:
            p = os.path.join(root, name)
            st = os.lstat(p)
            # a hard link (sparsify links the source model's weights) is the source's file too: its mode is theirs
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and stat.S_IMODE(st.st_mode) & mode != mode:
                os.chmod(p, stat.S_IMODE(st.st_mode) | mode)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """`data` as JSON that strict parsers (jq, JavaScript) read: a NaN or infinite number is written as null
    (json.dumps writes `NaN` and `Infinity`, which they refuse)."""
    return atomic_write_text(path, json.dumps(finite(data), indent=2, sort_keys=False, allow_nan=False) + "\n")


def finite(data: Any) -> Any:
    """`data` with every float that is not finite replaced by None, in lists and dicts at any depth."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite(v) for v in data]
    return data


def lineage_ref(spec: str) -> str:
    """A model reference as manifests record it: a local path absolute, anything else (builtin:NAME) as given."""
    path = Path(str(spec)).expanduser()
    return os.path.abspath(path) if path.exists() else str(spec)  # `..` folded, links kept


def write_manifest(
    directory: str | os.PathLike[str],
    stage: str,
    parents: list[str] | None = None,
    recipe: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Write `llmfast.json` into an artifact directory (usually the temporary one inside `atomic_dir`). A parent
    that is a local path is recorded absolute, so the lineage is found from any folder (builtin:NAME stays). The
    provenance says what made it (llmfast's commit, the libraries, the machine: llmfast/provenance.py)."""
    from llmfast.provenance import provenance

    manifest = {
        "stage": stage,
        "parents": [lineage_ref(p) for p in parents or []],
        "recipe": recipe or {},
        "metrics": metrics or {},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "llmfast_version": __version__,
        "provenance": provenance(),
        **extra,
    }
    atomic_write_json(Path(directory) / MANIFEST, manifest)
    return manifest


def step_folders(folder: Path) -> list[Path]:
    """The `step-N` folders of a checkpoints folder in step order: as numbers, so step-1000000 comes after
    step-999999 (as text it came first, and each new checkpoint was pruned as the oldest once written)."""
    def step(p: Path) -> int:
        tail = p.name[len("step-"):]
        return int(tail) if tail.isdigit() else -1

    return sorted(folder.glob("step-*"), key=lambda p: (step(p), p.name))


def latest_step(folder: Path) -> Path | None:
    """The last complete `step-N` folder (its state.json written last) of a checkpoints folder, or None."""
    found = [p for p in step_folders(folder) if (p / "state.json").is_file()]
    return found[-1] if found else None


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The manifest of an artifact directory, or None for a directory llmfast did not make."""
    path = Path(directory) / MANIFEST
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}): delete or fix it") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text: delete or fix it") from None
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror or e}): delete or fix it") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a manifest is a JSON object, this is a {type(data).__name__}: delete or fix it")
    from llmfast.modelfiles import older_relufy  # an older llmfast's export of a relufy model did not record it
    data.update(older_relufy(directory, data))
    for section in ("sparsity", "quantization"):  # what loaders dispatch on: their shape is checked here, once
        spec = data.get(section)
        if spec is None or (section == "quantization" and isinstance(spec, bool)):  # bool: older versions' form
            continue
        if not isinstance(spec, dict):
            raise UserError(f"{path}: {section} must be a JSON object, not {type(spec).__name__}: rebuild the "
                            "artifact, or delete or fix this file")
        for key, kind in (("method", str), ("config", dict), ("attention", dict), ("weights", str)):
            if spec.get(key) is not None and not isinstance(spec[key], kind):
                raise UserError(f"{path}: {section}.{key} must be a JSON {'string' if kind is str else 'object'}, not "
                                f"{type(spec[key]).__name__}: rebuild the artifact, or delete or fix this file")
    return data
