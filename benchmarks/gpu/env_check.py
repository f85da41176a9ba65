"""What the GPU run ran on: nvidia-smi, JAX's devices, torch's CUDA, versions, unmet requirements.

``python benchmarks/gpu/env_check.py OUT/env.txt``: prints it and writes the same text there.
Fails (exit 1) when lvmzoo, scvi-tools or anndata cannot be imported, or, with
``JAX_PLATFORMS=cuda``, when JAX sees no GPU.
"""

from __future__ import annotations

import io
import os
import platform
import subprocess
import sys
import time
from contextlib import redirect_stdout
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

PACKAGES = ("lvmzoo", "jax", "jaxlib", "jax-cuda13-plugin", "numpyro", "flax", "optax", "anndata",
            "scvi-tools", "torch", "lightning", "pandas", "scipy", "numpy", "h5py", "zarr",
            "scanpy", "psutil")


def report() -> int:
    try:
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as err:
        smi = f"nvidia-smi: {err}"
    print(smi.rstrip())
    print(f"python {platform.python_version()} ({sys.executable}); cpus {os.cpu_count()}; "
          f"JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS')}; "
          f"LVMZOO_BENCH_ACCELERATOR={os.environ.get('LVMZOO_BENCH_ACCELERATOR')}")
    for package in PACKAGES:
        try:
            print(f"  {package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            print(f"  {package} -")
    check = subprocess.run([sys.executable, str(HERE / "install_wheels.py"), "--check",
                            str(HERE.parents[1] / ".whl")], capture_output=True, text=True)
    print((check.stdout + check.stderr).rstrip())
    started = time.perf_counter()
    import jax

    print(f"jax backend {jax.default_backend()}, devices {jax.devices()}")
    import torch

    cuda = torch.cuda.is_available()
    print(f"torch {torch.__version__}, cuda available {cuda}"
          + (f", {torch.cuda.get_device_name(0)}" if cuda else ""))
    import anndata  # noqa: F401
    import scvi  # noqa: F401

    import lvmzoo  # noqa: F401
    print(f"imports ok in {time.perf_counter() - started:.1f} s")
    if os.environ.get("JAX_PLATFORMS") == "cuda" and jax.default_backend() != "gpu":
        print("JAX has no GPU")
        return 1
    return 0


def main() -> int:
    buffer = io.StringIO()

    class Tee(io.TextIOBase):
        def write(self, text):
            sys.__stdout__.write(text)
            buffer.write(text)
            return len(text)

    try:
        with redirect_stdout(Tee()):
            code = report()
    except Exception as err:  # still write what was seen
        print(f"env check FAILED: {type(err).__name__}: {err}")
        buffer.write(f"env check FAILED: {type(err).__name__}: {err}\n")
        code = 1
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(buffer.getvalue())
    return code


if __name__ == "__main__":
    sys.exit(main())
