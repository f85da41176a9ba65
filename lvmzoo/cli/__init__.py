"""The ``lvmzoo`` command: one module per command, each a thin layer over the Python API.

Every step is a call a notebook could make::

    lvmzoo fit ppca data.h5ad --out runs/ppca     # setup_anndata -> fit -> save_model
    lvmzoo fit my_models.py:PoissonMF data.h5ad --out runs/pmf   # a user's model
    lvmzoo evaluate runs/ppca new.h5ad            # load_model -> query_anndata -> evaluate
    lvmzoo de runs/scvi --groupby cell_type --group1 B --out de.csv
    lvmzoo compare data.h5ad --models ppca,fa --out cmp
    lvmzoo predict runs/scanvi new.h5ad --out p.csv
    lvmzoo map-query runs/scanvi query.h5ad --out runs/query
    lvmzoo integration-metrics runs/scvi/result.h5ad --batch-key b --labels-key l
    lvmzoo perturb runs/cpa --predict B --out p
    lvmzoo datasets

Each command lives in ``lvmzoo/cli/<command>.py`` with an ``add_parser(commands)``
that declares its options and a ``run(args)`` that does the work; what they
share (reading DATA and RUN_DIR, atomic outputs, the one-line error) is in
:mod:`lvmzoo.cli._common`.  A model's hyperparameters become ``fit`` flags from
its class (:mod:`lvmzoo.cli.options`), so a registered or user model needs no
CLI code.  ``MODEL`` may be a registered name, an installed ``lvmzoo.models``
entry point, ``package.module:Class`` or ``path/to/file.py:Class``.

Exit status: 0 on success; 2 for a usage or data error (one line
``lvmzoo: error: ...`` on stderr); 1 when the fit diverged (the last finite
parameters are saved); 130 when interrupted with Ctrl-C (the model so far is
saved).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Optional, Sequence

from lvmzoo.cli import (compare, datasets, de, evaluate, fit, integration_metrics, map_query,
                        perturb, predict)
from lvmzoo.cli._common import (EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_USAGE, PROG, UsageError,
                                _Parser, _usage_error)
from lvmzoo.cli.options import hyperparameters

# The order of 'lvmzoo --help'.
COMMANDS = (fit, evaluate, de, compare, predict, map_query, integration_metrics, perturb, datasets)
_hyperparameters = hyperparameters  # the name the CLI tests know


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``lvmzoo`` command line; returns the exit status.

    Args:
      argv: arguments without the program name; ``None`` reads ``sys.argv``.
    """
    if argv is None:  # the process is the command's own
        _fewer_malloc_arenas()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = build_parser(argv)
        args = parse_args(parser, argv)
        with warnings.catch_warnings():
            _one_line_data_warnings()
            return args.run(args)
    except SystemExit as exit_:  # --help and --version exit through argparse
        return int(exit_.code or 0)
    except UsageError as err:
        return _usage_error(err)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        from lvmzoo.data.registry import DataError
        from lvmzoo.infer.ensemble import NeedsOneModel

        if isinstance(err, (DataError, NeedsOneModel)):
            return _usage_error(err)
        raise  # a genuine bug: keep the traceback


# glibc's malloc gives threads that allocate at once heaps ("arenas") of their own, up
# to 8 per core, and memory freed in one is not reused by the others: with XLA's threads
# compiling and running programs, `lvmzoo fit scvi` on 200,000 cells peaked ~110 MiB
# higher with glibc's default than with two arenas (1,935 against 1,827 MiB; wall time
# 131.7 against 127.7 s on the same loaded 2-core machine; benchmarks/bench_cli_scale.py).
MALLOC_ARENAS = 2


def _fewer_malloc_arenas() -> None:
    """At most :data:`MALLOC_ARENAS` malloc arenas (glibc only; ``MALLOC_ARENA_MAX`` wins)."""
    import os

    if os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-8, MALLOC_ARENAS)  # -8: M_ARENA_MAX
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        pass


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The argument parser of ``lvmzoo`` and its subcommands.

    A model named by import path in ``argv`` (``lvmzoo fit mod:Class``) is imported
    first, so that its hyperparameters are flags of this parser too.
    """
    from lvmzoo import __version__
    from lvmzoo.models.registry import available_models

    _import_models_named_in(argv)
    parser = _Parser(
        prog=PROG,
        description="Fit and evaluate latent-variable models of single-cell RNA-seq data "
        "(a JAX / NumPyro model zoo).",
        epilog="Run 'lvmzoo COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    models = available_models()
    for command in COMMANDS:
        if command is fit:
            command.add_parser(commands, models)
        else:
            command.add_parser(commands)
    return parser


def _import_models_named_in(argv: Sequence[str]) -> None:
    """Import the ``module:Class`` models of ``fit MODEL`` / ``compare MODEL,MODEL``."""
    from lvmzoo.cli.options import model_class

    argv = list(argv)
    specs = []
    if argv[:1] == ["fit"] and len(argv) > 1 and not argv[1].startswith("-"):
        specs.append(argv[1])
    if argv[:1] == ["compare"] and len(argv) > 1 and not argv[1].startswith("-"):
        specs.extend(s.strip() for s in argv[1].split(","))
    for spec in specs:
        if ":" in spec:
            model_class(spec)  # registers it, or a one-line UsageError


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``, allowing options before optional positionals (``fit M --epochs 3 D``).

    Plain argparse binds ``fit``'s optional ``DATA`` as soon as it meets ``MODEL``
    and then rejects a ``DATA`` given after an option; the command's arguments
    are then parsed again with ``parse_intermixed_args``, which has no such limit.
    """
    args, extras = parser.parse_known_args(argv)
    if extras:
        command = args.command
        args = args.command_parser.parse_intermixed_args(argv[argv.index(command) + 1:])
        args.command = command
    return args


def _one_line_data_warnings() -> None:
    """Show the data layer's warnings as ``lvmzoo: warning: ...`` (no file/line dump)."""
    from lvmzoo.data.registry import DataWarning

    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, DataWarning):
            print(f"{PROG}: warning: {' '.join(str(message).split())}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show


__all__ = ["EXIT_DIVERGED", "EXIT_INTERRUPTED", "EXIT_USAGE", "PROG", "UsageError",
           "build_parser", "main", "parse_args"]
