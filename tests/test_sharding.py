"""Data-parallel sharding: 8 simulated CPU devices give the single-device results."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "sharded.py"


@pytest.mark.slow  # a subprocess with 8 simulated devices: about a minute on 2 cores
def test_eight_devices_equal_one_to_1e12():
    p = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    uneven = got.pop("uneven")
    assert "64 samples do not split evenly over 5 devices" in uneven
    assert len(got) == 16
    bad = {k: v for k, v in got.items() if not v <= 1e-12}
    assert not bad, bad
