"""Where the repository's modules are, for scripts run as `python examples/X.py` or `python benchmarks/X.py`.

Importing this puts the repository root (the trainer scripts), examples/ (tiny_assets, demo_scoring) and tests/
(testing_utils) on sys.path. A script in examples/ finds this module by itself (Python puts a script's folder on the
path); a script in benchmarks/ first adds examples/ with one `sys.path.insert`. Tests get the same folders from
`[tool.pytest.ini_options] pythonpath` in pyproject.toml.
"""

import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]

for folder in (ROOT / "tests", ROOT / "examples", ROOT):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
