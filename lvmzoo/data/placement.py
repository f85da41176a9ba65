"""Where a fit's arrays live: one device, or a 1-D mesh of devices across hosts.

Data parallelism is JAX's own SPMD machinery and nothing else: a fit on
several devices is the same compiled epoch program, jitted with shardings.
Every step's minibatch is split along its cells over a one-axis mesh
(``NamedSharding(mesh, P("cells"))``); parameters and optimiser state are
replicated; XLA inserts the reduction of gradients (and of batch-norm
statistics, and of the loss) itself.  Nothing here is a collective or a
process pool.

Several hosts are the same program too: after ``jax.distributed.initialize``
every process runs the same ``fit`` on the same data and seed, computes the
same cell order, and supplies only the columns of each global minibatch that
belong to its own devices (``jax.make_array_from_process_local_data``).

:class:`Placement` wraps the mesh (or its absence, today's single-device
fits) so the driver calls the same few methods either way.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

CELL_AXIS = "cells"

Devices = Union[None, int, str, Mesh]


def make_mesh(devices: Devices) -> Optional[Mesh]:
    """The 1-D ``"cells"`` mesh a fit runs on; ``None`` for a single-device fit.

    Args:
      devices: ``None``: one device (the default device), unless
        ``jax.distributed`` runs several processes, then every device of every
        process; an ``int`` ``n``: the first ``n`` of ``jax.devices()``;
        ``"all"``: every device of every process; a :class:`jax.sharding.Mesh`
        with a single axis named ``"cells"``, used as given.

    Raises:
      ValueError: naming what is wrong with ``devices``.
    """
    if isinstance(devices, Mesh):
        if devices.axis_names != (CELL_AXIS,):
            raise ValueError(f"a fit's mesh needs one axis named {CELL_AXIS!r}, got axes "
                             f"{devices.axis_names}; e.g. jax.sharding.Mesh(jax.devices(), "
                             f"({CELL_AXIS!r},))")
        return devices
    available = jax.devices()
    if devices is None:
        if jax.process_count() == 1:
            return None
        chosen = available
    elif isinstance(devices, str):
        if devices != "all":
            raise ValueError(f"devices must be None, an int, 'all' or a Mesh, got {devices!r}")
        chosen = available
    elif isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
        if not 1 <= devices <= len(available):
            raise ValueError(f"devices={devices} but {len(available)} device(s) are available "
                             f"({available[0].platform}); choose 1..{len(available)} or 'all'")
        if jax.process_count() > 1 and devices != len(available):
            raise ValueError(f"devices={devices} with {jax.process_count()} processes: every "
                             "process must take part; use devices='all' (or None), or a Mesh")
        if devices == 1:
            return None
        chosen = available[:devices]
    else:
        raise ValueError(f"devices must be None, an int, 'all' or a Mesh, got {devices!r}")
    # Auto axes: the partitioner propagates the cell sharding from the inputs
    # through the whole step (jax.make_mesh would default to Explicit axes).
    return Mesh(np.array(chosen), (CELL_AXIS,), axis_types=(AxisType.Auto,))


@dataclasses.dataclass(frozen=True)
class Placement:
    """Puts a fit's arrays on its devices; a no-op wrapper when ``mesh`` is ``None``.

    Attributes:
      mesh: the 1-D ``"cells"`` mesh, or ``None`` for one device.
    """

    mesh: Optional[Mesh] = None

    @classmethod
    def create(cls, devices: Devices) -> "Placement":
        return cls(make_mesh(devices))

    @property
    def n_devices(self) -> int:
        return 1 if self.mesh is None else self.mesh.size

    @property
    def n_processes(self) -> int:
        if self.mesh is None:
            return 1
        return len({d.process_index for d in self.mesh.devices.flat})

    @property
    def is_lead_process(self) -> bool:
        """Whether this process reports (progress bars): process 0 of the mesh."""
        return jax.process_index() == min(d.process_index for d in self._devices())

    def _devices(self):
        return jax.devices()[:1] if self.mesh is None else list(self.mesh.devices.flat)

    def describe(self) -> dict[str, Any]:
        """What the fit ran on, for ``history``."""
        devices = self._devices()
        return {"n_devices": len(devices), "n_processes": self.n_processes,
                "platform": devices[0].platform}

    # -- sizes -------------------------------------------------------------

    def global_batch_size(self, batch_size: int) -> int:
        """``batch_size`` rounded down to a multiple of the number of devices (with a warning).

        Each device takes an equal share of every minibatch, so the global
        batch must divide by the device count; rounding down keeps the number
        of cells per step at or under what was asked.
        """
        n = self.n_devices
        if batch_size % n == 0:
            return batch_size
        if batch_size < n:
            raise ValueError(f"batch_size={batch_size} is smaller than the {n} devices; "
                             f"use at least one cell per device (batch_size >= {n})")
        rounded = batch_size - batch_size % n
        warnings.warn(f"batch_size {batch_size} does not divide by the {n} devices; using "
                      f"{rounded} cells per step ({rounded // n} per device)", stacklevel=3)
        return rounded

    def local_columns(self, batch_size: int) -> tuple[int, int]:
        """``(start, stop)``: the cells of each global minibatch this process supplies."""
        if self.mesh is None:
            return 0, batch_size
        indices = self._cell_sharding(2).addressable_devices_indices_map((1, batch_size))
        starts = sorted(ix[1].start or 0 for ix in indices.values())
        stops = sorted(ix[1].stop if ix[1].stop is not None else batch_size
                       for ix in indices.values())
        start, stop = starts[0], stops[-1]
        if stop - start != len(set(starts)) * (batch_size // self.n_devices):
            raise ValueError("this process's devices are not contiguous in the mesh; order "
                             "the mesh's devices by process (as jax.devices() does)")
        return start, stop

    # -- placing arrays ----------------------------------------------------

    def replicate(self, tree, *, alias_host: bool = False):
        """Every leaf (host or single-device values, the same in every process) on every device.

        ``alias_host``: on one device, place host arrays with ``jax.device_put``, which on
        the CPU uses a 64-byte aligned NumPy buffer as it is instead of copying it (see
        :mod:`lvmzoo.data.aligned`); for data left unchanged while it is placed.
        """
        if self.mesh is None:
            return jax.tree.map(jax.device_put if alias_host else jnp.asarray, tree)
        sharding = NamedSharding(self.mesh, P())
        return jax.tree.map(
            lambda leaf: jax.make_array_from_process_local_data(sharding, np.asarray(leaf)), tree)

    def shard_steps(self, tree, batch_size: int):
        """Step inputs ``(n_steps, B_local, ...)`` of this process, as global ``(n_steps, B, ...)``.

        ``B_local`` is this process's columns (:meth:`local_columns`); in a
        single process it is the whole minibatch.
        """
        if self.mesh is None:
            return jax.tree.map(jnp.asarray, tree)

        def place(leaf):
            leaf = np.asarray(leaf)
            sharding = self._cell_sharding(leaf.ndim)
            shape = (leaf.shape[0], batch_size) + leaf.shape[2:]
            return jax.make_array_from_process_local_data(sharding, leaf, shape)

        return jax.tree.map(place, tree)

    def step_spec(self, tree_of_shapes):
        """``jax.ShapeDtypeStruct`` leaves with the steps' sharding, to compile ahead of time."""
        if self.mesh is None:
            return tree_of_shapes
        return jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                           sharding=self._cell_sharding(len(s.shape))),
            tree_of_shapes)

    def constrain_cells(self, x: jax.Array) -> jax.Array:
        """Inside a compiled step: keep ``x`` ``(B, ...)`` split along its cells."""
        if self.mesh is None:
            return x
        spec = P(CELL_AXIS, *([None] * (x.ndim - 1)))
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

    def jit(self, fun):
        """``jax.jit(fun)``; on a mesh every output is replicated (parameters, losses)."""
        if self.mesh is None:
            return jax.jit(fun)
        return jax.jit(fun, out_shardings=NamedSharding(self.mesh, P()))

    def local(self, tree):
        """Replicated leaves as this process's own single-device copies (for host-side use)."""
        if self.mesh is None:
            return tree

        def one(leaf):
            if isinstance(leaf, jax.Array) and len(leaf.sharding.device_set) > 1:
                if not leaf.is_fully_replicated:
                    raise ValueError("expected a replicated array; got sharding "
                                     f"{leaf.sharding}")
                return leaf.addressable_data(0)
            return leaf

        return jax.tree.map(one, tree)

    def _cell_sharding(self, ndim: int) -> NamedSharding:
        """Arrays ``(n_steps, B, ...)`` split along ``B``."""
        return NamedSharding(self.mesh, P(None, CELL_AXIS, *([None] * (ndim - 2))))


__all__ = ["CELL_AXIS", "Placement", "make_mesh"]
