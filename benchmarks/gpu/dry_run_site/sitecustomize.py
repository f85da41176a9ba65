"""CPU dry run of benchmarks/gpu/run.sh: import only what the GPU machine will have.

On ``PYTHONPATH`` (run.sh puts it there when ``LVMZOO_GPU_DRY_RUN=1``), so every
process of the dry run, workers included, refuses to import a top-level module
whose distributions are all outside the GPU machine's image
(``../image_packages.txt``) and the carried wheels (``.whl/``): a dependency the
wheel list misses fails here, with its name, rather than there.  Versions are
not imitated: this interpreter's own are used.
"""

import os
import re
import sys
from importlib import abc, metadata
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _allowed() -> set[str]:
    names = {"lvmzoo", "pip"}
    for line in (_HERE.parent / "image_packages.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            names.add(_canon(line.strip()))
    wheels = Path(os.environ.get("LVMZOO_GPU_WHEELS", _HERE.parents[2] / ".whl"))
    for wheel in wheels.glob("*.whl"):
        names.add(_canon(wheel.name.split("-")[0]))
    return names


class _ImageOnly(abc.MetaPathFinder):
    def __init__(self):
        self.allowed = _allowed()
        self.owners = metadata.packages_distributions()
        self.refused: set[str] = set()

    def find_spec(self, fullname, path=None, target=None):
        if "." in fullname:
            return None
        owners = {_canon(d) for d in self.owners.get(fullname, [])}
        if owners and not owners & self.allowed:
            if fullname not in self.refused:
                self.refused.add(fullname)
                print(f"[dry run] refused import {fullname!r} (from {sorted(owners)}: not on "
                      "the GPU machine nor among the carried wheels)", file=sys.stderr)
            raise ModuleNotFoundError(f"No module named {fullname!r} (dry run: not on the GPU "
                                      "machine)", name=fullname)
        return None


if os.environ.get("LVMZOO_GPU_DRY_RUN") == "1":
    sys.meta_path.insert(0, _ImageOnly())
