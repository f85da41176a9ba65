"""One small scVI fit in a fresh process, for ``tests/test_scale.py``.

Forced host devices (``XLA_FLAGS=--xla_force_host_platform_device_count=N``)
and ``jax.distributed`` must be set up before jax is imported, so these fits
run in their own processes::

    python tests/_fit_worker.py DATA.h5ad OUT.npz --devices all \
        [--coordinator localhost:PORT --num-processes 2 --process-id I] [--only backed]

Writes ``OUT.npz``: the parameters of an in-memory fit (``memory/<site>``) and
of a fit streamed from the backed file (``backed/<site>``), in the same block
order, their losses, and what each fit ran on.  :func:`fit_both` is also what the test runs on one
device as the reference, so both sides use exactly the same settings.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

# Steps per streamed chunk: 10 steps per epoch arrive as chunks of 4, 4 and 2.
STEPS_PER_CHUNK = 4
SETTINGS = dict(epochs=3, batch_size=48, seed=1, validation_fraction=0.2, progress=False)
BLOCKS = dict(block_size=64, window_blocks=3)


def model():
    from lvmzoo.models import SCVI

    return SCVI(n_hidden=16, n_latent=4)


def optimizer(n_train: int):
    """Plain SGD on the per-cell loss.

    Adam divides each gradient by its own running scale, which turns the
    rounding noise of directions with (mathematically) zero gradient, such as
    a bias just before batch norm, into steps of the full learning rate; sums
    over 4 devices round differently from sums over 1, so Adam's parameters
    would differ in exactly those directions while SGD's agree to ~1e-6.
    """
    import optax

    return optax.chain(optax.scale(1.0 / n_train), optax.sgd(0.01))


def fit_both(path: str, devices=None, only=None) -> dict:
    """``{"memory": FittedModel, "backed": FittedModel}``: ``path`` in memory and streamed.

    Both fits take their cells in the same block-shuffled order, so they are
    the same fit; the streamed one arrives in chunks of ``STEPS_PER_CHUNK``
    steps (10 steps per epoch: chunks of 4, 4 and 2).  ``only``: ``"memory"`` or
    ``"backed"`` to fit just one of them.
    """
    import anndata as ad

    import lvmzoo
    from lvmzoo.data import streaming
    from lvmzoo.data.streaming import BlockShuffle

    in_memory = lvmzoo.setup_anndata(ad.read_h5ad(path), batch_key="batch")
    backed = lvmzoo.setup_anndata(ad.read_h5ad(path, backed="r"), batch_key="batch")
    n_train = in_memory.n_cells - round(SETTINGS["validation_fraction"] * in_memory.n_cells)
    fits = {}
    for name, data in (("memory", in_memory), ("backed", backed)):
        if only not in (None, name):
            continue
        previous = streaming.CHUNK_BYTES
        streaming.CHUNK_BYTES = STEPS_PER_CHUNK * SETTINGS["batch_size"] * _bytes_per_cell(data)
        try:
            fits[name] = lvmzoo.fit(model(), data, optimizer=optimizer(n_train), devices=devices,
                                    shuffle=BlockShuffle(**BLOCKS), **SETTINGS)
        finally:
            streaming.CHUNK_BYTES = previous
    return fits


def flatten(fitted) -> dict[str, np.ndarray]:
    """Parameters (by path), losses and devices of a fit, as arrays."""
    import jax

    out = {jax.tree_util.keystr(path): np.asarray(leaf)
           for path, leaf in jax.tree_util.tree_leaves_with_path(fitted.params)}
    for key in ("loss", "validation_loss", "n_devices", "n_processes"):
        out[key] = np.asarray(fitted.history[key])
    return out


def _bytes_per_cell(data) -> int:
    """What StreamingSource sends per cell: its padded entries, or its dense row if smaller."""
    if not data.is_backed:
        return 1
    width = int(data.x.row_nnz().max())
    return 4 * (2 * width if 2 * width < data.n_genes else data.n_genes)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("out")
    parser.add_argument("--devices", default=None)
    parser.add_argument("--coordinator", default=None)
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--only", choices=("memory", "backed"), default=None)
    args = parser.parse_args(argv)
    import jax

    if args.coordinator:
        jax.distributed.initialize(coordinator_address=args.coordinator,
                                   num_processes=args.num_processes, process_id=args.process_id)
    devices = args.devices
    if devices is not None and devices != "all":
        devices = int(devices)
    fits = fit_both(args.data, devices, args.only)
    np.savez(args.out, **{f"{name}/{key}": value for name, fitted in fits.items()
                          for key, value in flatten(fitted).items()})
    print(json.dumps({"process": jax.process_index(), "devices": len(jax.devices()),
                      "local_devices": len(jax.local_devices())}), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
