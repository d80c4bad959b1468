"""The public API type-checks with mypy, and `import loomc` stays light."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_the_package_type_checks_with_mypy():
    proc = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", "loomc"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (ROOT / "loomc" / "py.typed").exists()


def test_import_loomc_imports_no_model_or_sdk():
    code = ("import sys, loomc\n"
            "heavy = [m for m in ('torch', 'sentence_transformers', 'transformers', 'anthropic', 'openai',"
            " 'matplotlib', 'genai_prices', 'pydantic.main') if m in sys.modules]\n"
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""
