"""A chain recipe as a plan: stages, their parents, the order they run in, and the key of each result.

A chain recipe names stages; each has a `type` (a verb: tasks, finetune, merge, quantize, sparsify, eval,
bench) and `with:`, that verb's own recipe (or config) without its output. A string `${NAME}` inside
`with:` stands for stage NAME's output directory, which makes NAME a parent. A stage's key is a hash of its
type, its `with:` section, the size and modification time of every file that section names outright (a model
folder's files, a data file, a text: `input_files`) and its parents' keys: a result is reused while its key is
unchanged, and a changed setting or input file changes the keys of that stage and of everything downstream, and
nothing else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from pydantic import Field

from llmfast.artifacts import MAX_OUTPUT_NAME
from llmfast.errors import UserError
from llmfast.recipe import StrictModel
from llmfast.registry import did_you_mean

REF = re.compile(r"\$\{([A-Za-z0-9_.-]+)\}")
NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class StageConfig(StrictModel):
    type: str
    with_: dict[str, Any] = Field(default_factory=dict, alias="with")
    flags: list[str] = []  # extra command-line flags for the verb, e.g. [--adapter-rank, concat] for merge
    launch: list[str] = []  # run the verb under a launcher, e.g. [torchrun, --nproc_per_node, "2"] (DDP/FSDP)


class ChainRecipe(StrictModel):
    output: Path  # the run directory: one folder per stage, the report at the top
    stages: dict[str, StageConfig] = Field(min_length=1)


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    type: str
    section: dict[str, Any]
    flags: tuple[str, ...]
    launch: tuple[str, ...]
    parents: tuple[str, ...]
    key: str
    settings: str = ""  # the key without the input files' sizes and times: tells a changed setting from a changed file


MAX_FILES = 10_000  # files of one folder fingerprinted: beyond them, the folder's later files are not looked at


def input_files(value: Any, skip: Path | None = None) -> dict[str, Any]:
    """{path: [size, mtime_ns]} of every existing file a `with:` value names outright, each file of a named folder
    (hidden ones and hidden folders left out, at most MAX_FILES) by its path under it. `${NAME}` paths are a
    parent's, keyed by the parent's key; so is anything under `skip` (the chain's own run folder)."""
    found: dict[str, Any] = {}
    if isinstance(value, dict):
        for v in value.values():
            found.update(input_files(v, skip))
    elif isinstance(value, list):
        for v in value:
            found.update(input_files(v, skip))
    elif isinstance(value, str) and value and not REF.search(value) and "\0" not in value:
        path = Path(value).expanduser()
        try:
            if skip is not None and (path.resolve() == skip or skip in path.resolve().parents):
                return found
            if path.is_file():
                st = path.stat()
                found[value] = [st.st_size, st.st_mtime_ns]
            elif path.is_dir():
                found.update(_folder_files(value, path))
        except (OSError, RuntimeError):  # unreadable, vanishing or a link loop (Python 3.11's RuntimeError): the
            pass  # verb says what is wrong with it when it runs
    return found


def _folder_files(value: str, path: Path) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(f for f in files if not f.startswith(".")):
            if len(found) >= MAX_FILES:
                return found
            st = os.stat(os.path.join(root, name))
            found[f"{value}/{Path(root, name).relative_to(path)}"] = [st.st_size, st.st_mtime_ns]
    return found


def references(value: Any) -> set[str]:
    """Names of the stages `${NAME}` strings in `value` point at."""
    if isinstance(value, str):
        return set(REF.findall(value))
    if isinstance(value, dict):
        return set().union(*(references(v) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(references(v) for v in value)) if value else set()
    return set()


def substitute(value: Any, paths: dict[str, Path]) -> Any:
    """`value` with every `${NAME}` replaced by stage NAME's output directory."""
    if isinstance(value, str):
        return REF.sub(lambda m: str(paths[m.group(1)]), value)
    if isinstance(value, dict):
        return {k: substitute(v, paths) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, paths) for v in value]
    return value


def order(recipe: ChainRecipe, where: str, known_types: list[str]) -> list[str]:
    """Stage names in an order where every parent comes first; a cycle or an unknown name is one line."""
    stages = recipe.stages
    for name, stage in stages.items():
        if not re.fullmatch(NAME, name):  # re.match let 't\n' through (`$` matches before a last newline): a folder
            raise UserError(f"{where}: stage name {name!r} must be letters, digits, '.', '_' or '-'")
        if len(name.encode()) > MAX_OUTPUT_NAME:  # its folder and .state/NAME.* files must fit 255 bytes
            raise UserError(f"{where}: stage name '{name[:40]}...' is {len(name.encode())} bytes: at most "
                            f"{MAX_OUTPUT_NAME}")
        if name.endswith(".checkpoints") or name == "llmfast-run.json":
            # a stage's work folder is STAGE.checkpoints beside it; the others are the run folder's own
            raise UserError(f"{where}: stage name '{name}' is taken by the run folder's own files: rename the stage")
        if stage.type not in known_types:
            raise UserError(f"{where}: stages.{name}.type: unknown stage type '{stage.type}'"
                            f"{did_you_mean(stage.type, known_types)}; choose from {', '.join(known_types)}")
        for ref in sorted(references(stage.with_) | references(stage.flags)):
            if ref not in stages:
                raise UserError(f"{where}: stages.{name} refers to ${{{ref}}}, which is not a stage"
                                f"{did_you_mean(ref, list(stages))}")
    done: list[str] = []
    visiting: list[str] = []

    def visit(name: str) -> None:
        if name in done:
            return
        if name in visiting:
            cycle = visiting[visiting.index(name):] + [name]
            raise UserError(f"{where}: the stages form a cycle: {' -> '.join(cycle)}; a stage cannot depend on "
                            "its own output")
        visiting.append(name)
        stage = stages[name]
        for parent in sorted(references(stage.with_) | references(stage.flags)):
            visit(parent)
        visiting.pop()
        done.append(name)

    for name in stages:
        visit(name)
    return done


def _made_with(stage: StageConfig) -> str | None:
    """The method of a quantize or sparsify stage, as its `with:` names it (None when it does not parse: the
    stage's own recipe check says why when it runs)."""
    from llmfast.quant import parse_quantization

    if stage.type == "sparsify":
        section = stage.with_.get("sparsify")
        return section.get("method") if isinstance(section, dict) else None
    if stage.type == "quantize":
        try:
            spec = parse_quantization(stage.with_.get("quantization"))
        except UserError:
            return None
        return spec.method if spec is not None else None
    return None


def check_sources(recipe: ChainRecipe, where: str) -> None:
    """A stage whose source model is another stage's artifact of a kind its verb refuses (a TEAL artifact to
    quantize, a quantized model to merge: llmfast/sources.py) is one line before anything runs, not once the
    stages before it (an hour of relufy) are done."""
    from llmfast.sources import planned_refusal

    for name, stage in recipe.stages.items():
        with_ = stage.with_
        sources = [with_.get("model")] if stage.type != "merge" else [with_.get("base_model"), *(
            m.get("model") for m in with_.get("models") or [] if isinstance(m, dict))]
        for ref in sorted(references(sources)):
            parent = recipe.stages[ref]
            why = planned_refusal(stage.type, f"${{{ref}}}", parent.type, _made_with(parent))
            if why:
                raise UserError(f"{where}: stages.{name}: {why}")


def plan(recipe: ChainRecipe, where: str, known_types: list[str]) -> list[Stage]:
    """The stages in running order, each with its key."""
    keys: dict[str, str] = {}
    planned = []
    ordered = order(recipe, where, known_types)
    try:
        run_dir = Path(recipe.output).expanduser().resolve()
    except (OSError, RuntimeError):  # a link that leads back to itself (Python 3.11 raises RuntimeError)
        raise UserError(f"{where}: output {recipe.output} goes through a symbolic link that loops back to itself: "
                        "remove or fix the link, or choose another output") from None
    check_sources(recipe, where)
    for name in ordered:
        cfg = recipe.stages[name]
        parents = tuple(sorted(references(cfg.with_) | references(cfg.flags)))
        settings = {"type": cfg.type, "with": cfg.with_, "flags": cfg.flags, "parents": {p: keys[p] for p in parents}}
        files = input_files([cfg.with_, cfg.flags], run_dir)
        keys[name] = _digest({**settings, "files": files} if files else settings)  # no file: the key it always had
        planned.append(Stage(name, cfg.type, cfg.with_, tuple(cfg.flags), tuple(cfg.launch), parents, keys[name],
                             _digest(settings)))
    return planned


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def downstream(stages: list[Stage], start: str) -> set[str]:
    """`start` and every stage that depends on it, directly or not."""
    found = {start}
    for stage in stages:  # in running order, so parents are decided first
        if found & set(stage.parents):
            found.add(stage.name)
    return found
