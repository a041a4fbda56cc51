"""The documentation site builds with no warning, and documents every public name."""

import os
import re
import subprocess
import sys

import mpjax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")


def test_api_reference_lists_every_public_name_once():
  with open(os.path.join(DOCS, "api.md"), encoding="utf-8") as f:
    documented = re.findall(r"^\.\. (?:auto\w+|py:data)::\s+mpjax\.(\w+)",
                            f.read(), flags=re.M)
  assert sorted(documented) == sorted(set(documented)), "listed twice"
  assert set(documented) == set(mpjax.__all__)


def test_docs_build_with_warnings_as_errors(tmp_path):
  # The command docs/building.md gives, into a fresh directory.
  result = subprocess.run(
      [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b",
       "html", DOCS, str(tmp_path / "html")],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-4000:]  # -W: any warning fails
  assert (tmp_path / "html" / "api.html").exists()
