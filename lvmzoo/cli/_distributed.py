"""``lvmzoo fit --distributed``: one fit over several processes and machines, from the CLI.

Every process runs the same command on the same DATA with the same seed;
``jax.distributed.initialize()`` connects them before anything touches a
device, and the fit then runs over every device of every process as the
Python API does (``docs/scaling.md``, "Several hosts").  Process 0 writes the
outputs (``--out``: the model, history, result.h5ad, metrics and plots) and
prints the summary; the others write nothing, print nothing and exit 0 once
it has finished (they wait for it: ``jax.distributed`` shuts all processes
down together).

When is a run distributed:

* ``--distributed``, or any of ``--coordinator``, ``--num-processes``,
  ``--process-id``: always; what is not given, jax reads from the launcher's
  environment (Slurm, Open MPI's ``mpirun``, Kubernetes with the
  ``kubernetes`` package, Cloud TPU) and from ``JAX_COORDINATOR_ADDRESS``.
* Without those flags, only when a launcher says it started several processes
  of this command (:func:`launched_processes`): ``srun`` with more than one task
  (``SLURM_STEP_NUM_TASKS > 1``, which ``srun`` sets for its tasks but an
  ``sbatch`` script's own single process does not have, so ``lvmzoo fit`` typed
  in a multi-task batch script is *not* distributed), ``mpirun`` with more than
  one rank (``OMPI_COMM_WORLD_SIZE > 1``), or ``JAX_NUM_PROCESSES > 1`` with
  ``JAX_COORDINATOR_ADDRESS`` (set by hand or by a Kubernetes JobSet).  A pod's
  ``KUBERNETES_SERVICE_HOST`` alone is not enough: every pod has it.
* ``--no-distributed`` turns it off.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import sys
import tempfile
import warnings
from typing import Optional

from lvmzoo.cli._common import PROG, UsageError

# How long the processes other than 0 wait at exit for process 0 to finish
# writing the outputs (the latent, metrics and plots of every cell: minutes for
# millions of cells); jax's default of 5 minutes is too short for that.
SHUTDOWN_TIMEOUT_S = 24 * 3600

# (variable, launcher): a launcher's count of the processes it started.
LAUNCHER_COUNTS = (
    ("SLURM_STEP_NUM_TASKS", "Slurm's srun"),
    ("OMPI_COMM_WORLD_SIZE", "Open MPI's mpirun"),
    ("JAX_NUM_PROCESSES", "a JAX_NUM_PROCESSES launch"),
)


def add_distributed_options(parser: argparse.ArgumentParser) -> None:
    """The ``--distributed`` flags of ``lvmzoo fit``."""
    group = parser.add_argument_group(
        "several processes or machines (jax.distributed)",
        "Run the same command in every process; process 0 writes --out. Without flags, a run "
        "is distributed when srun (SLURM_STEP_NUM_TASKS > 1), mpirun (OMPI_COMM_WORLD_SIZE > 1) "
        "or JAX_NUM_PROCESSES > 1 with JAX_COORDINATOR_ADDRESS started several processes.")
    group.add_argument("--distributed", action=argparse.BooleanOptionalAction, default=None,
                       help="connect the processes of this fit with jax.distributed."
                            "initialize(), which reads Slurm, Open MPI and Kubernetes settings "
                            "itself, and train on every device of every process (default: on "
                            "when a launcher started several processes, see above)")
    group.add_argument("--coordinator", metavar="HOST:PORT", default=None,
                       help="address of process 0, where the processes meet (implies "
                            "--distributed; default: from the launcher or "
                            "JAX_COORDINATOR_ADDRESS)")
    group.add_argument("--num-processes", type=int, metavar="N", default=None,
                       help="number of processes (implies --distributed; default: from the "
                            "launcher or JAX_NUM_PROCESSES)")
    group.add_argument("--process-id", type=int, metavar="I", default=None,
                       help="this process's number, 0..N-1 (implies --distributed; default: "
                            "from the launcher or JAX_PROCESS_ID)")


def launched_processes(environ=None) -> Optional[tuple[str, int]]:
    """``(variable, count)`` when a launcher started several processes of this command, or ``None``.
    """
    environ = os.environ if environ is None else environ
    for variable, _ in LAUNCHER_COUNTS:
        try:
            count = int(environ.get(variable, ""))
        except ValueError:
            continue
        if count <= 1:
            continue
        if variable == "SLURM_STEP_NUM_TASKS" and "SLURM_PROCID" not in environ:
            continue
        if variable == "JAX_NUM_PROCESSES" and not environ.get("JAX_COORDINATOR_ADDRESS"):
            continue
        return variable, count
    return None


def start_distributed(args) -> bool:
    """Connect this process to the others when the run is distributed; whether it writes ``--out``.

    Returns ``True`` in a single-process run and in process 0.  In the other
    processes ``args.out`` becomes a temporary directory (removed at exit),
    so that nothing they do lands in ``--out``, and warnings are silenced
    (process 0 shows them).

    Raises:
      UsageError: a bad flag, or ``jax.distributed`` could not start (one line).
    """
    explicit = (args.coordinator, args.num_processes, args.process_id)
    if args.distributed is False:
        if any(value is not None for value in explicit):
            raise UsageError("--coordinator, --num-processes and --process-id need "
                             "--distributed; drop --no-distributed")
        return True
    launched = launched_processes()
    if not args.distributed and all(v is None for v in explicit) and launched is None:
        return True
    num_processes = args.num_processes
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES", "").isdigit():
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    process_id = args.process_id
    if process_id is None and os.environ.get("JAX_PROCESS_ID", "").isdigit():
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if num_processes is not None and num_processes < 1:
        raise UsageError(f"--num-processes must be at least 1, got {num_processes}")
    if process_id is not None and (process_id < 0 or (num_processes is not None
                                                      and process_id >= num_processes)):
        raise UsageError(f"--process-id must be in 0..{(num_processes or 1) - 1}, "
                         f"got {process_id}")
    import jax
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():  # a bug: something used a device too early
        raise RuntimeError("jax's backend started before --distributed could connect the "
                           "processes; nothing may touch a device before start_distributed")
    try:
        jax.distributed.initialize(coordinator_address=args.coordinator,
                                   num_processes=num_processes, process_id=process_id,
                                   shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S)
    except (ValueError, RuntimeError) as err:
        raise UsageError(
            f"--distributed: jax.distributed.initialize() failed ({_first(err)}); outside "
            "Slurm, Open MPI and Kubernetes give --coordinator HOST:PORT --num-processes N "
            "--process-id I (the same HOST:PORT, that of process 0, in every process)") from None
    _connect_collectives()
    index, count = jax.process_index(), jax.process_count()
    if index == 0:
        how = ""
        if launched and not args.distributed and all(v is None for v in explicit):
            by = dict(LAUNCHER_COUNTS)[launched[0]]
            how = (f", started by {by} ({launched[0]}={launched[1]}; --no-distributed turns "
                   "this off)")
        print(f"{PROG}: process 0 of {count} under jax.distributed{how}: training on "
              f"{len(jax.devices())} devices, {len(jax.local_devices())} here; this process "
              "writes --out", file=sys.stderr)
        return True
    scratch = tempfile.mkdtemp(prefix=f"lvmzoo-process{index}-")
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    args.out = scratch
    warnings.simplefilter("ignore")
    sys.stdout.flush()  # and nothing on stdout, from Python or from C++ (gloo)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    return False


def _connect_collectives() -> None:
    """One tiny collective over every device, while the processes are still in step.

    jax's CPU collectives (gloo) connect the processes at their first
    collective and give the others 30 seconds to get there; the first one of a
    fit comes after reading the data and compiling, which one machine may
    finish minutes after another.  Connected here, right after
    ``jax.distributed.initialize`` (itself a barrier), the later collectives
    wait for a late process instead of failing with ``Gloo context
    initialization failed: ... GetKeyValue() timed out``.  On GPUs (NCCL) it is
    a harmless all-reduce of one number.
    """
    from jax.experimental import multihost_utils

    # gloo prints "[Gloo] Rank 0 is connected to 1 peer ranks ..." to stdout
    # (C++), where the command's own output goes: send it to stderr instead.
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        multihost_utils.sync_global_devices("lvmzoo fit --distributed")
    finally:
        _flush_c_stdout()
        os.dup2(saved, 1)
        os.close(saved)


def _flush_c_stdout() -> None:
    import ctypes

    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):  # no C library to flush: nothing buffered there
        pass


def _first(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return " ".join(lines[0].split()) if lines else type(err).__name__


__all__ = ["LAUNCHER_COUNTS", "SHUTDOWN_TIMEOUT_S", "add_distributed_options",
           "launched_processes", "start_distributed"]
