"""pyproject's declared dependency bounds against the environment the tests run in.

The lower bounds in `[project] dependencies` are what a user's pip honours: a bound below the oldest version the
tests ever ran on lets pip keep an old package that llmfast cannot import or use (s53: peft 0.17 does not import
beside transformers 5). These checks keep the two in step: an environment that holds a version below a declared
minimum (or a Python outside requires-python) fails here, naming the package, instead of failing somewhere deep in
the suite. They cannot tell that a bound is too low for an environment nobody tested; docs/environment.md says
how the bounds were found."""

from __future__ import annotations

import importlib.metadata as md
import os
import subprocess
import sys

import pytest

from conftest import REPO

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")
packaging = pytest.importorskip("packaging", reason="comparing versions needs packaging (pytest's own dependency)")
from packaging.requirements import Requirement  # noqa: E402
from packaging.specifiers import SpecifierSet  # noqa: E402
from packaging.version import Version  # noqa: E402


def _project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _unmet(requirements: list[str]) -> list[str]:
    """One line per requirement whose installed version is missing or outside its specifier."""
    unmet = []
    for line in requirements:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            installed = md.version(req.name)
        except md.PackageNotFoundError:
            unmet.append(f"{req.name} is not installed (pyproject wants {req})")
            continue
        if not req.specifier.contains(Version(installed), prereleases=True):
            unmet.append(f"{req.name} {installed} is installed, pyproject wants {req}")
    return unmet


def test_every_declared_dependency_is_installed_within_its_bounds() -> None:
    unmet = _unmet(_project()["dependencies"])
    assert not unmet, "; ".join(unmet)


def test_this_python_is_one_that_requires_python_allows() -> None:
    spec = SpecifierSet(_project()["requires-python"])
    running = ".".join(map(str, sys.version_info[:3]))
    assert spec.contains(running), f"Python {running}, pyproject's requires-python is {spec}"


def test_a_version_below_a_declared_minimum_is_named() -> None:
    """The check itself: an installed package against a bound one release above it (and its own bound)."""
    installed = md.version("pyyaml")
    above = Version(installed).release[:2]
    above = f"{above[0]}.{above[1] + 1}"
    assert _unmet([f"PyYAML>={above}", f"pyyaml>={installed}", "no-such-llmfast-dep>=1"]) == [
        f"PyYAML {installed} is installed, pyproject wants PyYAML>={above}",
        "no-such-llmfast-dep is not installed (pyproject wants no-such-llmfast-dep>=1)",
    ]


def test_progress_bars_take_their_pace_from_the_environment() -> None:
    """tqdm's floor (4.66, the first that reads TQDM_* settings from the environment): the CLI paces bars written into
    a log through them (process_exit.LOG_BARS, inherited by vLLM's and torchrun's processes), and TQDM_DISABLE=1 is
    how users switch bars off. tqdm 4.65 ignores them all, repainting into a log every 0.1 s."""
    from llmfast.process_exit import LOG_BARS

    code = ("import os; from tqdm import tqdm\n"
            "with tqdm(total=1, file=open(os.devnull, 'w')) as b: print(b.mininterval, b.maxinterval)\n"
            "os.environ['TQDM_DISABLE'] = '1'; import importlib, tqdm.std; importlib.reload(tqdm.std)\n"
            "print(tqdm.std.tqdm(total=1).disable)")
    p = subprocess.run([sys.executable, "-c", code], env={**os.environ, **LOG_BARS}, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == [LOG_BARS["TQDM_MININTERVAL"] + ".0", LOG_BARS["TQDM_MAXINTERVAL"] + ".0", "True"], (
        f"tqdm {md.version('tqdm')}: {p.stdout!r}")
