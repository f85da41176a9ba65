"""Install the carried wheels (.whl/) that the GPU machine needs, into one folder.

Run there by ``run.sh`` (no network; ``pip install --no-index --no-deps``)::

    python3 benchmarks/gpu/install_wheels.py .whl /tmp/site     # then PYTHONPATH=/tmp/site:$PWD
    python3 benchmarks/gpu/install_wheels.py --check .whl        # after: print unmet requirements

A wheel is installed when its distribution is absent from this interpreter, or
when the version present breaks a requirement of lvmzoo (``pyproject.toml``)
or of another carried wheel (e.g. numpyro 0.21.0 < lvmzoo's 0.22.0, pandas 3
vs anndata's ``<3``).  Otherwise the image's own build is kept (it was built
for that machine, e.g. against its CUDA).

``--image-packages FILE --plan-only`` (the CPU dry run) prints the plan as if
only the distributions named in FILE were present.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]


def wheel_meta(path: Path) -> tuple[str, Version, list[Requirement]]:
    """(canonical name, version, unconditional requirements) of one wheel."""
    with zipfile.ZipFile(path) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        text = zf.read(name).decode()
    fields = {"Name": None, "Version": None}
    requires = []
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(": ")
        if key in fields:
            fields[key] = value.strip()
        elif key == "Requires-Dist":
            req = Requirement(value)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                requires.append(req)
    return canonicalize_name(fields["Name"]), Version(fields["Version"]), requires


def lvmzoo_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"]]


def installed(image: set[str] | None) -> dict[str, Version]:
    """Canonical name -> version of what this interpreter has (or, with ``image``, would have)."""
    out = {}
    for dist in metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"] or "")
        if name and (image is None or name in image) and name not in out:
            out[name] = Version(dist.version)
    return out


def plan(wheels: list[Path], have: dict[str, Version]) -> list[tuple[Path, str]]:
    metas = [(w, *wheel_meta(w)) for w in wheels]
    requirements = lvmzoo_requirements() + [r for _, _, _, reqs in metas for r in reqs]
    chosen = []
    for path, name, version, _ in metas:
        if name not in have:
            chosen.append((path, f"absent here -> {version}"))
            continue
        broken = [str(r) for r in requirements if canonicalize_name(r.name) == name
                  and not r.specifier.contains(have[name], prereleases=True)]
        if broken:
            chosen.append((path, f"{have[name]} here breaks {', '.join(sorted(set(broken)))} "
                                 f"-> {version}"))
        else:
            print(f"keep  {name} {have[name]} (carried {version} not needed)")
    for path, why in chosen:
        print(f"install {path.name}: {why}")
    return chosen


def check(wheels: list[Path]) -> int:
    """Print each requirement of lvmzoo and of the carried wheels that this interpreter misses."""
    have = installed(None)
    requirements = [("lvmzoo", r) for r in lvmzoo_requirements()]
    for path in wheels:
        name, _, reqs = wheel_meta(path)
        requirements += [(name, r) for r in reqs]
    unmet = [(who, r) for who, r in requirements
             if canonicalize_name(r.name) not in have
             or not r.specifier.contains(have[canonicalize_name(r.name)], prereleases=True)]
    for who, r in unmet:
        print(f"unmet: {who} needs {r} (have {have.get(canonicalize_name(r.name), 'nothing')})")
    print(f"requirements checked: {len(requirements)}, unmet: {len(unmet)}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("wheels", nargs="?", type=Path, default=REPO / ".whl")
    parser.add_argument("target", nargs="?", type=Path, default=Path("/tmp/site"))
    parser.add_argument("--image-packages", type=Path, default=None,
                        help="pretend only these distributions are present (dry run)")
    parser.add_argument("--plan-only", action="store_true", help="print the plan, install nothing")
    parser.add_argument("--check", action="store_true",
                        help="print unmet requirements of this interpreter and exit")
    args = parser.parse_args(argv)
    wheels = sorted(args.wheels.glob("*.whl"))
    if args.check:
        return check(wheels)
    if not wheels:
        print(f"no wheels in {args.wheels}: run benchmarks/gpu/fetch_wheels.sh here first "
              "and carry .whl", file=sys.stderr)
        return 1
    image = None
    if args.image_packages:
        image = {canonicalize_name(line.strip()) for line in
                 args.image_packages.read_text().splitlines()
                 if line.strip() and not line.startswith("#")}
    chosen = plan(wheels, installed(image))
    if args.plan_only or not chosen:
        return 0
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
               "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(args.target),
               *[str(p) for p, _ in chosen]]
    return subprocess.run(command).returncode


if __name__ == "__main__":
    sys.exit(main())
