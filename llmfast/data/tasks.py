"""Synthetic tasks with exactly checkable answers, deterministic by seed.

They are what the fine-tuning and merging stages train on and what `llmfast eval` scores: each is
something the small built-in model does badly out of the box and can learn.

- dates:   reformat a written date ("5 March 2021", "Mar 5, 2021", ...) as ISO 8601 (2021-03-05)
- units:   convert between metric units (3.5 km -> m = 3500), the answer a plain decimal
- extract: pull name, age, city and job out of a sentence as JSON with fixed keys

Rows are chat examples: {"task", "messages": [user, assistant]}; the assistant turn is the answer.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import random
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable

from llmfast.artifacts import atomic_write_text, check_output
from llmfast.errors import UserError

Row = dict[str, Any]


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    make: Callable[[random.Random], tuple[str, str]]  # rng -> (prompt, answer)
    check: Callable[[str, str], bool]  # (prediction, answer) -> correct


def _clean(text: str) -> str:
    text = text.strip()
    if text.startswith("```"):
        text = text.strip("`").removeprefix("json").strip()
    return text.strip().strip("`").strip()


def exact_match(prediction: str, answer: str) -> bool:
    return _clean(prediction) == answer.strip()


def json_match(prediction: str, answer: str) -> bool:
    try:
        return json.loads(_clean(prediction)) == json.loads(answer)
    except (json.JSONDecodeError, TypeError):
        return False


# ---------------------------------------------------------------- dates
# English names spelled here: calendar's follow the process's LC_TIME, so a caller that had set a German locale
# (locale.setlocale(locale.LC_ALL, "")) got 'Mär 23, 2018' from the same seed, not the committed test sets' rows.
_MONTHS = ("", "January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_DATE_STYLES = [
    lambda d: f"{_MONTHS[d.month]} {d.day}, {d.year}",
    lambda d: f"{d.day} {_MONTHS[d.month]} {d.year}",
    lambda d: f"{_MONTHS[d.month][:3]} {d.day}, {d.year}",
    lambda d: f"{d.day} {_MONTHS[d.month][:3]} {d.year}",
    lambda d: f"{_DAYS[d.weekday()]}, {_MONTHS[d.month]} {d.day}, {d.year}",
]
_DATE_PROMPTS = [
    "Convert the date '{date}' to ISO 8601 format (YYYY-MM-DD). Answer with the date only.",
    "Rewrite '{date}' as YYYY-MM-DD. Reply with nothing but the date.",
    "What is {date} in ISO format (YYYY-MM-DD)? Give only the date.",
]


def _make_date(rng: random.Random) -> tuple[str, str]:
    day = dt.date(1950, 1, 1) + dt.timedelta(days=rng.randrange(365 * 100))
    shown = rng.choice(_DATE_STYLES)(day)
    return rng.choice(_DATE_PROMPTS).format(date=shown), day.isoformat()


# ---------------------------------------------------------------- units
# (big unit, small unit, how many small in one big)
_UNIT_PAIRS = [
    ("km", "m", 1000), ("m", "cm", 100), ("cm", "mm", 10), ("m", "mm", 1000),
    ("kg", "g", 1000), ("g", "mg", 1000), ("L", "mL", 1000), ("t", "kg", 1000),
]


def format_decimal(value: Decimal) -> str:
    """Plain notation, no exponent, no trailing zeros: 3500, 0.035, 12.5."""
    text = format(value.normalize(), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def _make_units(rng: random.Random) -> tuple[str, str]:
    big, small, factor = rng.choice(_UNIT_PAIRS)
    places = rng.choice([0, 0, 1, 2])
    value = Decimal(rng.randrange(1, 10000 if places else 1000)).scaleb(-places)
    if rng.random() < 0.5:
        src, dst, result = big, small, value * factor
    else:
        src, dst, result = small, big, value / factor
    prompt = f"Convert {format_decimal(value)} {src} to {dst}. Answer with the number only."
    return prompt, format_decimal(result)


# ---------------------------------------------------------------- extract
_FIRST = ["Maria", "James", "Aiko", "Lars", "Fatima", "Diego", "Chen", "Olga", "Kwame", "Priya", "Tomas",
          "Amara", "Noah", "Ingrid", "Mateo", "Yusuf", "Elena", "Ravi", "Sofia", "Jonas"]
_LAST = ["Lopez", "Smith", "Tanaka", "Berg", "Haddad", "Silva", "Wang", "Petrova", "Mensah", "Sharma",
         "Novak", "Okafor", "Keller", "Dubois", "Rossi", "Kaya", "Ivanova", "Patel", "Moreau", "Larsen"]
_CITIES = ["Lyon", "Osaka", "Bergen", "Lagos", "Porto", "Denver", "Krakow", "Cusco", "Accra", "Pune",
           "Graz", "Leeds", "Quebec", "Tunis", "Malmo", "Perth", "Bilbao", "Nagoya", "Dakar", "Turin"]
_JOBS = ["nurse", "engineer", "baker", "teacher", "pilot", "chemist", "carpenter", "lawyer", "farmer", "chef"]
_SENTENCES = [
    "{name}, a {age}-year-old {job} from {city}, joined the team last spring.",
    "Born and raised in {city}, {name} works as {a_job} and just turned {age}.",
    "The {job} {name} ({age}) moved to {city} after finishing school.",
    "At {age}, {name} is the youngest {job} ever hired in {city}.",
    "{name} lives in {city}; the {age}-year-old has been {a_job} for years.",
]
_EXTRACT_PROMPT = (
    'Extract the person\'s name, age, city and job from the text as JSON with the keys "name", "age" '
    '(a number), "city" and "job" (in lowercase). Reply with the JSON only.\nText: {text}'
)


def _make_extract(rng: random.Random) -> tuple[str, str]:
    person = {"name": f"{rng.choice(_FIRST)} {rng.choice(_LAST)}", "age": rng.randrange(18, 91),
              "city": rng.choice(_CITIES)}
    person["job"] = rng.choice(_JOBS)
    a_job = ("an " if person["job"][0] in "aeiou" else "a ") + person["job"]
    text = rng.choice(_SENTENCES).format(a_job=a_job, **person)
    return _EXTRACT_PROMPT.format(text=text), json.dumps(person)


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("dates", "written date -> ISO 8601 (YYYY-MM-DD)", _make_date, exact_match),
        Task("units", "metric unit conversion, answer a plain decimal", _make_units, exact_match),
        Task("extract", "name/age/city/job from a sentence as JSON", _make_extract, json_match),
    ]
}


def check(task: str, prediction: str, answer: str) -> bool:
    """Score one prediction: the task's own check, or whitespace-trimmed exact match for other task sets."""
    found = TASKS.get(task)
    return (found.check if found else exact_match)(prediction, answer)


def generate(task: str, n: int, seed: int, exclude: set[str] | None = None) -> list[Row]:
    """`n` distinct examples of `task`, the same for the same seed; prompts in `exclude` are skipped."""
    spec = TASKS[task]
    rng = random.Random(f"{task}:{seed}")
    seen = set(exclude or ())
    rows: list[Row] = []
    for _ in range(n * 50):
        if len(rows) == n:
            break
        prompt, answer = spec.make(rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        rows.append({"task": task, "messages": [{"role": "user", "content": prompt},
                                                {"role": "assistant", "content": answer}]})
    if len(rows) < n:
        raise UserError(f"task {task} could only make {len(rows)} distinct examples, not {n}: ask for fewer rows")
    return rows


def split(task: str, n_train: int, n_test: int, seed: int = 0) -> tuple[list[Row], list[Row]]:
    """Disjoint train and test sets: no test prompt appears in train. Seed s draws its test set from stream 2s and its
    training set from 2s + 1 (seed 0: streams 0 and 1, as ever), so no seed's test set is another seed's training
    stream: with s and s + 1, `--seed 1`'s test set was 199 of 200 prompts of seed 0's training set."""
    test = generate(task, n_test, seed=2 * seed)
    train = generate(task, n_train, seed=2 * seed + 1, exclude={r["messages"][0]["content"] for r in test})
    return train, test


def jsonl_text(rows: list[Row]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_jsonl(path: str | Path, rows: list[Row]) -> Path:
    return atomic_write_text(path, jsonl_text(rows))


MAX_ROWS = 1_000_000


def check_request(tasks: list[str], n_train: int, n_test: int, keys: tuple[str, str] = ("--train", "--test")
                  ) -> None:
    """The task names and sizes `plan_task_files` takes (a chain checks its tasks stages with it before any runs,
    naming its own `keys` for the two sizes)."""
    train, test = keys
    if n_train < 1 or n_test < 1:
        raise UserError(f"{train} and {test} must be at least 1 (got {n_train} and {n_test})")
    if n_train + n_test > MAX_ROWS:  # made in memory: 10**12 grew without end
        raise UserError(f"{train} and {test} make {n_train + n_test} rows a task: at most {MAX_ROWS:,}")
    for name in tasks:
        if name not in TASKS:
            also = " ('all' alone, not with other names)" if name == "all" else ""
            raise UserError(f"unknown task '{name}'{also}: choose from {', '.join(TASKS)} or 'all'")


def plan_task_files(tasks: list[str], out_dir: str | Path, n_train: int, n_test: int, seed: int = 0,
                    overwrite: bool = False) -> list[tuple[Path, str, bool]]:
    """(path, content, changed) of every file `tasks` would write under `out_dir`, checked before any is written.

    A file that already holds exactly the content asked for is left in place (changed=False), so re-running
    the same command is harmless; a file with other content (another seed or size, or the user's own data)
    is refused unless `overwrite`.
    """
    check_request(tasks, n_train, n_test)
    out = Path(out_dir)
    check_output(out, overwrite=True)  # a file, a parent that is a file, no permission: one line
    plan = []
    for name in tasks:
        train, test = split(name, n_train, n_test, seed)
        for path, rows in ((out / name / "train.jsonl", train), (out / name / "test.jsonl", test)):
            text = jsonl_text(rows)
            if path.is_dir() or path.parent.is_file():
                raise UserError(f"{path if path.is_dir() else path.parent}: in the way of the file {path}: "
                                "move it, or choose another --out")
            same = path.is_file() and path.read_bytes() == text.encode("utf-8")
            if path.exists() and not same and not overwrite:
                raise UserError(f"{path} exists with other content: pass --overwrite to replace it, or choose "
                                "another --out")
            plan.append((path, text, not same))
    return plan


def write_task(task: str, out_dir: str | Path, n_train: int, n_test: int, seed: int = 0,
               overwrite: bool = False) -> tuple[Path, Path]:
    """Write TASK/train.jsonl and TASK/test.jsonl under `out_dir` (see `plan_task_files` for what is refused)."""
    plan = plan_task_files([task], out_dir, n_train, n_test, seed, overwrite)
    write_planned(plan)
    return plan[0][0], plan[1][0]


def write_planned(plan: list[tuple[Path, str, bool]]) -> None:
    """Write the changed files of `plan` (from `plan_task_files`). When one fails (a full disk), the files and
    folders this call created are removed again, so what was there before is all that is left (a file replaced
    under --overwrite stays replaced)."""
    files: list[Path] = []
    dirs: list[Path] = []
    try:
        for path, text, changed in plan:
            if changed:
                dirs += [d for d in path.parents if not d.exists()]
                files += [] if path.exists() else [path]
                atomic_write_text(path, text)
    except BaseException:
        for f in files:
            f.unlink(missing_ok=True)
        for d in sorted(dirs, key=lambda d: len(d.parts), reverse=True):  # the deepest first
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
