"""The order in which `make test` hands the test files to its two workers: the longest first (tests/conftest.py),
an order xdist keeps only with --no-loadscope-reorder."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import LONGEST_FIRST, REPO


def test_the_longest_files_go_first_then_those_with_the_most_tests():
    # a renamed or removed file would silently drop out of the order
    assert LONGEST_FIRST and len(set(LONGEST_FIRST)) == len(LONGEST_FIRST)
    assert [n for n in LONGEST_FIRST if not (REPO / "tests" / n).is_file()] == []
    first = "test_serve_relu.py"  # 6 tests, cheap to collect (vLLM is imported in its tests only)
    assert first in LONGEST_FIRST
    files = ["tests/test_metrics.py", "tests/test_encodings.py", f"tests/{first}"]  # 4 tests, 12, and the long one
    p = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q", *files],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    order = list(dict.fromkeys(line.split("::")[0] for line in p.stdout.splitlines() if "::" in line))
    assert order == [f"tests/{first}", "tests/test_encodings.py", "tests/test_metrics.py"]


def test_make_test_keeps_the_collections_order():
    """xdist's own order (most tests first, on by default) would undo the collection's."""
    recipe = re.search(r"^test:.*\n((?:\t.*\n)+)", (REPO / "Makefile").read_text(), re.M).group(1)
    assert "--dist loadfile" in recipe and "--no-loadscope-reorder" in recipe, recipe
