"""The documentation site builds from the docstrings with warnings as errors (issue 20)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_docs_build_without_warnings(tmp_path):
    out = tmp_path / "html"
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         str(ROOT / "docs"), str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    api = (out / "api.html").read_text(encoding="utf-8")
    for name in ("check_model", "register_model", "lvmzoo.fit", "LatentModel", "cell_plate",
                 "hyperparameter", "SCVI", "differential_expression", "simulate_counts"):
        assert name in api, name
    readme = (out / "readme.html").read_text(encoding="utf-8")
    assert "Quick start" in readme
    for page in ("writing_models.html", "scaling.html", "notebooks.html", "index.html"):
        assert (out / page).exists(), page
