"""benchmarks/RESULTS.md's generated tables match the newest results on disk."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_results_tables_are_up_to_date():
    p = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "report.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert "up to date" in p.stdout


def test_an_empty_table_does_not_swallow_the_next():
    """A new, empty ``<!-- table -->`` marker pair is filled in place; the prose and the
    table after it stay (the first pattern ran on to the next table's end marker)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from report import PATTERN

    text = "<!-- table: a -->\n<!-- end -->\nprose\n<!-- table: b -->\n| x |\n<!-- end -->\n"
    found = [(m.group("name"), m.group("body")) for m in PATTERN.finditer(text)]
    assert found == [("a", ""), ("b", "| x |")]
    filled = PATTERN.sub(lambda m: m.group(1) + m.group("name").upper() + "\n" + m.group(4), text)
    assert filled == (
        "<!-- table: a -->\nA\n<!-- end -->\nprose\n<!-- table: b -->\nB\n<!-- end -->\n"
    )
