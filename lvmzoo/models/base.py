"""The model interface: what a zoo model is, and the one plate every model uses.

A zoo model is a frozen dataclass holding only hyperparameters (no arrays, no
data) with

* ``model(batch)`` – the NumPyro generative program, top to bottom, with named
  sites and ``with cell_plate(batch):`` around everything per cell;
* ``guide(batch)`` – its default variational family (same site names);
* ``latent(params, batch, key)`` – the per-cell representation it reports;
* optionally ``log_likelihood(params, batch)`` – the exact per-cell marginal
  ``log p(x)`` where the model has one in closed form,
  ``init_params(batch, key)`` – data-dependent initial values, and
  ``registration()`` – ``obs`` columns beyond batch and labels that the model
  reads (e.g. a perturbation as a categorical covariate).

The SVI driver (:func:`lvmzoo.fit`) needs nothing else, so adding a model never
touches it.  ``params`` are always the *constrained* values keyed by site name.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
from typing import Any, ClassVar, Optional

import jax
import numpyro
from numpyro import handlers
from numpyro.infer import ELBO

from lvmzoo.data.source import Batch

Params = dict[str, Any]


def compiled(method):
    """Run a model method (e.g. ``init_params``) as one compiled program; the model is static.

    Executed op by op, a start-value computation of a few dozen ``jnp`` calls
    compiles a few dozen tiny programs in every new process; as one program it
    compiles once and then comes from the persistent cache (:mod:`lvmzoo.cache`).
    The method must be traceable (``jnp`` on its array arguments only).
    """
    jitted = jax.jit(method, static_argnums=0)

    @functools.wraps(method)
    def wrapper(self, *args):
        return jitted(self, *args)

    return wrapper


def hyperparameter(default: Any, *, minimum: Optional[float] = None, flag: Optional[str] = None,
                   cli: bool = True):
    """A model field with what the CLI needs to offer it as a flag (a dataclass field).

    Every field of a model is a hyperparameter and becomes an ``lvmzoo fit`` flag
    (``n_latent`` -> ``--n-latent``, help text from the class docstring's ``Args:``)
    without this; use it to say more::

        n_layers: int = hyperparameter(1, minimum=0)       # 0 is allowed
        n_epochs_kl_warmup: int | str = hyperparameter("auto", flag="kl-warmup")

    Args:
      default: the field's default value.
      minimum: smallest value the CLI accepts (default: 1 for integers whose default
        is not 0; floats must be positive).
      flag: the CLI flag without dashes (default: the field name with dashes).
      cli: ``False`` keeps the field off the command line.
    """
    metadata = {"minimum": minimum, "flag": flag, "cli": cli}
    return dataclasses.field(default=default, metadata={k: v for k, v in metadata.items()
                                                        if v is not None})


def cell_plate(batch: Batch) -> numpyro.plate:
    """The ``"cells"`` plate over ``batch.n_cells`` cells, subsampled to this minibatch.

    The plate's indices are the minibatch's own ``batch.index`` (substituted
    rather than drawn), so log-densities are scaled by ``n_cells / B`` (an
    unbiased estimate of the full-data ELBO) and any per-cell parameter
    declared inside the plate (e.g. by ``AutoNormal``) is indexed by the cells
    actually in the minibatch.
    """
    with handlers.substitute(data={"cells": batch.index}):
        return numpyro.plate("cells", batch.n_cells, subsample_size=batch.size, dim=-1)


@dataclasses.dataclass(frozen=True)
class LatentModel(abc.ABC):
    """Base class of zoo models; subclasses are frozen dataclasses of hyperparameters.

    Class attributes a subclass sets:
      name: short name used by the CLI, in saved runs and in ``obsm["X_<name>"]``.
      data_kind: ``"counts"``, ``"continuous"`` or ``"binary"`` — what ``batch.x``
        must hold after the data transform.
      default_transform: transform the CLI applies to count input by default.
      default_learning_rate: Adam step size the CLI uses by default.
      annotates_on_disk: ``True`` when :meth:`annotate` reads the cells in
        chunks (e.g. through ``lvmzoo.analysis.expression.map_cells``), so a fit
        from disk (``--backed``) writes its outputs too; by default such a fit
        writes only the latent, as the outputs may need every cell in memory.
    """

    name: ClassVar[str] = "model"
    data_kind: ClassVar[str] = "continuous"
    default_transform: ClassVar[str] = "none"
    default_learning_rate: ClassVar[float] = 1e-3
    annotates_on_disk: ClassVar[bool] = False

    @abc.abstractmethod
    def model(self, batch: Batch) -> None:
        """The generative program for one minibatch."""

    @abc.abstractmethod
    def guide(self, batch: Batch) -> None:
        """The default variational family for one minibatch."""

    def default_epochs(self, n_cells: int) -> int:
        """Epochs :func:`lvmzoo.fit` runs when none are given (early stopping may end it sooner).

        scvi-tools' rule for its deep models, ``min(round(20000 / n_cells * 400), 400)``:
        400 epochs up to 20,000 cells, then fewer so a fit sees about 8 M cells.
        Models that start from a data-driven solution override it.
        """
        return max(1, min(round(20000 / max(n_cells, 1) * 400), 400))

    def elbo(self) -> ELBO:
        """The ELBO estimator the driver optimises (override for enumeration)."""
        from lvmzoo.infer.elbo import Trace_ELBO  # here: lvmzoo.infer imports the models

        return Trace_ELBO()

    def for_data(self, data) -> "LatentModel":
        """The model :func:`lvmzoo.fit` fits to ``data`` (a CellData): ``self`` by default.

        A model whose settings name data (e.g. a category of an ``obs`` column)
        returns a copy with them resolved against ``data.registry`` (a field the
        saved config keeps), or raises :class:`~lvmzoo.data.registry.DataError`
        saying what is wrong with the data.
        """
        return self

    def init_params(self, batch: Batch, key: jax.Array) -> Optional[Params]:
        """Initial values of some params from a sample of cells; ``None`` = model defaults."""
        return None

    def init_params_per_cell(self, batch: Batch, key: jax.Array) -> Optional[Params]:
        """Initial values when a per-cell guide (``mean_field``, ``delta``, ...) replaces
        the model's own: its cells' latents then start at the prior, so a start
        that assumes the model's guide (e.g. globals at their maximum-likelihood
        values) can be worse than a neutral one.  Default: :meth:`init_params`.
        """
        return self.init_params(batch, key)

    @abc.abstractmethod
    def latent(self, params: Params, batch: Batch, key: jax.Array) -> jax.Array:
        """Per-cell representation, ``(B, n_latent)``."""

    def log_likelihood(self, params: Params, batch: Batch) -> Optional[jax.Array]:
        """Exact per-cell ``log p(x)``, ``(B,)``; ``None`` when there is no closed form."""
        return None

    def registration(self) -> dict[str, tuple[str, ...]]:
        """Keyword arguments of :func:`~lvmzoo.data.setup_anndata` naming the ``obs``
        columns this model reads besides batch and labels (``categorical_covariate_keys``,
        ``covariate_keys``); the CLI registers them.  The default reads none."""
        return {}

    def annotate(self, adata, params: Params, latent, data) -> list[str]:
        """Write model-specific outputs into ``adata`` (already a copy); return their keys.

        ``latent`` is the ``(n_cells, n_latent)`` array the caller stores in
        ``obsm["X_<name>"]``; ``data`` the CellData of ``adata``.  The default adds
        nothing more.  Outputs with one value per cell *and gene* (cells × genes,
        e.g. normalised expression) belong in :meth:`annotate_per_gene` instead, so
        that callers can skip them where they would not fit in memory.
        """
        return []

    def annotate_per_gene(self, adata, params: Params, data) -> list[str]:
        """Write cells × genes outputs into ``adata`` (e.g. ``layers[...]``); return their keys.

        Called by :meth:`lvmzoo.FittedModel.annotate` unless ``per_gene=False``
        (``lvmzoo fit`` skips them above a size: see ``--per-gene-outputs``).
        The default adds nothing.
        """
        return []

    def config(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
