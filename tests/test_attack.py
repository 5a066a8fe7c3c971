"""The attack of issue 16 (tests/attack.py) in full: 10 kill trials with the joblib launcher, the
concurrent-sweep cases and the bad-input cases; every count must be 0. About 15 minutes on one core."""
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="pip install 'ablate[parallel]'")


@pytest.mark.slow
def test_the_attack_finds_nothing(tmp_path):
    out = subprocess.run([sys.executable, "-m", "tests.attack", "--trials", "10", "--dir", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=3600)
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-3000:]
