"""JAX's persistent compilation cache, on by default: compile once per machine.

Every ``lvmzoo`` command is a new process, and without a persistent cache each
one compiled its programs (the epoch ``lax.scan``, validation, evaluation)
from nothing, seconds per model.  lvmzoo turns on JAX's own persistent
compilation cache when it is imported, so a second ``lvmzoo fit`` /
``evaluate`` / ``de`` with the same shapes loads the compiled programs
instead (``history["compile_seconds"]`` shows the difference).

Where the cache lives:

* ``$LVMZOO_CACHE_DIR`` if set (``off``, ``0``, ``none`` or an empty value
  turn the cache off);
* otherwise ``$XDG_CACHE_HOME/lvmzoo/jax``, i.e. ``~/.cache/lvmzoo/jax``.

A directory the user already gave JAX (``jax.config.update(
"jax_compilation_cache_dir", ...)`` or ``$JAX_COMPILATION_CACHE_DIR``) is left
as it is.  The cache is keyed by JAX on the program text, the compiler
options, the device kind and the JAX version, so a stale entry can never be
used for a different program; delete the directory to reclaim its space.
lvmzoo's programs take data, parameters and random keys as arguments (never
as constants closed over), so the same model and data shapes give the same
key in every process.

Compiling faster on CPU (:func:`use_fast_cpu_compilation`).  XLA's CPU backend
runs LLVM at optimisation level 3 by default; level 2 runs as fast and compiles in
a third to two thirds of the time (scVI, 2,000 genes, one core, empty cache:
the importance-sampled likelihood 4.3-5.3 -> 1.5-1.9 s to compile, 0.43-0.55 ->
0.43-0.47 s per 125 cells, the same scores bit for bit; a fit's epoch program
6.0 -> 4.3 s to compile, the same epoch times and the same parameters bit for
bit after 4 epochs; tests/test_compare.py and test_scvi.py 254 -> 196 s).
Neither level uses fast-math; a reduction may still round its last bit
differently (the mean of 125 float32 scores moved by 2e-4 of 1,739).  So lvmzoo adds ``--xla_backend_optimization_level=2``
to ``XLA_FLAGS`` when it is imported, unless the flags already name a level or
an accelerator plugin is installed (not measured there).  It takes effect when
JAX compiles its first program after that; set the level in ``XLA_FLAGS``
yourself (``3`` is XLA's default) to choose another.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Optional

import jax

ENV_VAR = "LVMZOO_CACHE_DIR"
_OFF = {"", "0", "off", "none", "false", "no"}
# Cache every program: the few dozen tiny ones that NumPyro's initialisation and
# eager array code compile cost more together (~0.05 s each) than reading them.
MIN_COMPILE_SECONDS = 0.0


def default_cache_dir() -> Optional[Path]:
    """The directory the cache uses by default, or ``None`` when ``LVMZOO_CACHE_DIR`` turns it off."""
    value = os.environ.get(ENV_VAR)
    if value is not None:
        return None if value.strip().lower() in _OFF else Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lvmzoo" / "jax"


def enable_compilation_cache(directory=None) -> Optional[Path]:
    """Point JAX's persistent compilation cache at ``directory`` (default: :func:`default_cache_dir`).

    Returns:
      The directory in use, or ``None`` if the cache is off.  When the user
      already configured a JAX cache directory and ``directory`` is not
      given, that one is kept and returned.
    """
    configured = jax.config.jax_compilation_cache_dir
    if directory is None and configured:
        return Path(configured)
    directory = default_cache_dir() if directory is None else Path(directory)
    if directory is None:
        return None
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # a read-only home: run without the cache rather than fail
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory


#: What :func:`use_fast_cpu_compilation` adds to ``XLA_FLAGS``.
FAST_CPU_COMPILATION_FLAG = "--xla_backend_optimization_level=2"

# Compiler options of programs that run once or on a few dozen cells (``svi.init``, the
# autoguide setup, check_model's battery), where compiling is nearly all the time: LLVM
# without its optimisations compiles in about half the time (the values came out the
# same bit for bit, batch-norm running statistics up to their last bit).
UNOPTIMISED_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}
# Packages that bring JAX an accelerator backend (the level is only measured on CPU).
_ACCELERATOR_PLUGINS = ("jax_plugins", "jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu")


def use_fast_cpu_compilation() -> bool:
    """Add :data:`FAST_CPU_COMPILATION_FLAG` to ``XLA_FLAGS`` (see the module docstring).

    Left alone when the flags already set a level, when ``JAX_PLATFORMS`` names
    anything but the CPU, or when an accelerator plugin is installed.  Returns
    whether the flag was added.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" in flags:
        return False
    platforms = {p.strip() for p in os.environ.get("JAX_PLATFORMS", "").lower().split(",")} - {""}
    if platforms != {"cpu"} and (platforms or any(
            importlib.util.find_spec(name) is not None for name in _ACCELERATOR_PLUGINS)):
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {FAST_CPU_COMPILATION_FLAG}".strip()
    return True


def disable_compilation_cache() -> None:
    """Stop reading and writing the persistent cache in this process."""
    jax.config.update("jax_compilation_cache_dir", None)


def compilation_cache_dir() -> Optional[Path]:
    """The directory JAX's persistent cache uses now, or ``None``."""
    configured = jax.config.jax_compilation_cache_dir
    return Path(configured) if configured else None
