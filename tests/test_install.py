"""The test set-up (``scripts/install.sh``): the cross-check dependency is there and clean.

torchattacks is the independent implementation the agreement tests compare aal's attacks and
evaluation suite with (``tests/test_apgd.py``, ``tests/test_attacks.py``). Those tests skip
without it, so on a machine set up by ``scripts/install.sh`` (what CI runs) its absence must be
an error, not a row of silent skips. It is installed with ``pip install --no-deps`` because its
metadata asks for torchvision, which does not work with this torch build: importing it must not
load torchvision as well.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_install_script_installs_torchattacks_without_its_dependencies():
    script = (ROOT / "scripts" / "install.sh").read_text()
    lines = [line for line in script.splitlines() if "torchattacks" in line and line.lstrip().startswith("python3 -m pip")]
    assert lines and all("--no-deps" in line for line in lines), lines
    assert "torchvision" not in "".join(lines)


def test_torchattacks_imports_without_torchvision():
    """Fails (not skips) when torchattacks is missing: run ``bash scripts/install.sh``."""
    probe = (
        "import sys, torchattacks\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'torchvision')\n"
        "print(torchattacks.__version__, len(loaded))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"torchattacks is not importable (run bash scripts/install.sh): {out.stderr.strip()[-300:]}"
    version, n_torchvision = out.stdout.split()
    assert version == "3.5.1"
    assert n_torchvision == "0", "importing torchattacks imported torchvision"
