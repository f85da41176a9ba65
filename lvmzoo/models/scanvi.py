"""SCANVI: scVI with cell-type labels as a discrete latent, for partly labelled data (Xu et al., 2021).

Generative story, for each cell in batch ``b`` (``s_b`` its one-hot code)::

    c ~ Cat(1/C, ..., 1/C)                         # its cell type, one of C labels
    u ~ N(0, I_K)                                  # variation within the type
    z | u, c ~ N(f_loc(u, c), diag f_scale(u, c)^2)  # an MLP of [u, onehot(c)]: "latent_prior"
    log l, x | z, s_b, l: scVI's library model, decoder and likelihood

The guide (all networks amortised, as scvi-tools)::

    z ~ q(z | x) = N(encoder(log 1p x))            # scVI's encoder
    c ~ q(c | z) = Cat(softmax(classifier(z)))     # a labelled cell: its label, with certainty
    u ~ q(u | z, c) = N(u_encoder(z, onehot(c)))

How the label enters the objective (Kingma et al.'s M2, and why).  A cell
whose label ``y`` is known contributes the ELBO of ``p(x, y)``: its ``c`` is
observed (the guide is the point mass at ``y``), so ``y`` shapes the latent
space through ``p(z | u, y)`` and ``q(u | z, y)`` directly.  An unlabelled
cell contributes the ELBO of ``p(x)`` with ``c`` summed out exactly under
``q(c | z)``::

    E_q(z|x) [ sum_c q(c|z) E_q(u|z,c)[log p(c) p(u) p(z|u,c) - log q(u|z,c)]
               + H(q(c|z)) + log p(x|z) - log q(z|x) ]

Neither term trains the classifier on the known labels (a labelled cell's
term has no ``q(c | z)`` in it), so, as in M2, the loss adds
``classification_ratio`` (default 50, scvi-tools') times the mean
cross-entropy ``-log q(y | z)`` over the labelled cells of each minibatch
(scvi-tools' normalisation: the weight does not depend on the share of
labelled cells).  scvi-tools' docs describe this objective but its code
sums ``c`` out for *every* cell, labelled ones included, so a known label
reaches the model only through the cross-entropy; here it is observed, as
in the story.  ``benchmarks/bench_family.py`` compares the accuracy of the
two.

The sum over ``c`` is exact and written into the programs: ``u`` has one
value per label (a ``"labels"`` plate) and the ``label`` site's value is the
label's indicator vector (:class:`LabelIndicator`).  While training the guide
emits the indicator's expectation ``q(c | z)`` (the one-hot label for
labelled cells); every label-dependent log-density (of ``c``, ``u`` and
``z``) is linear in the indicator, so :class:`numpyro.infer.Trace_ELBO`
computes exactly the sum above (what ``TraceEnum_ELBO``'s guide-side
enumeration computes; that estimator does not carry Flax batch-norm state).
In evaluation (``batch.training=False``) the guide draws ``c ~ q(c | z)``, so
the validation loss and the IWAE bound of :meth:`FittedModel.evaluate` are
ordinary Monte Carlo estimates (of ``log p(x, y)`` for labelled cells, of
``log p(x)`` for the others).

As in scvi-tools, the KL warm-up (scVI's, :meth:`SCVI._kl_warmup`) scales the
``c`` and ``u`` terms in model and guide; the ``z`` terms are never warmed
up.  Predictions are ``q(c | z = E[z | x])`` with the networks in evaluation
mode (scvi-tools' ``use_posterior_mean=True``).

Differences from scvi-tools' ``SCANVI``: the objective above (``c`` observed
for labelled cells); the classification term uses the minibatch's own
labelled cells rather than a second, labelled-only minibatch; the library
KL term is not warmed up (as scVI); the networks' conventions are scVI's
(:mod:`lvmzoo.models.scvi`).

References:
  Kingma, D. P., Rezende, D. J., Mohamed, S. & Welling, M. (2014).
  Semi-supervised learning with deep generative models. NeurIPS.
  https://arxiv.org/abs/1406.5298
  Xu, C., Lopez, R., Mehlman, E., Regier, J., Jordan, M. I. & Yosef, N. (2021).
  Probabilistic harmonization and annotation of single-cell transcriptomics
  data with deep generative models. Molecular Systems Biology 17, e9620.
  https://doi.org/10.15252/msb.20209620
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.contrib.module import flax_module
from numpyro.distributions import constraints

from lvmzoo.data.source import Batch
from lvmzoo.models.base import cell_plate
from lvmzoo.models.scvi import SCVI, _with_params
from lvmzoo.nn import MLP, GaussianEncoder

PREDICTION_OBS = "scanvi_prediction"
PROBABILITY_OBS = "scanvi_probability"
# Floor on probabilities inside logs: 0 * log(0) terms (labels a labelled cell
# does not have) must be 0 with a finite gradient.
_TINY = float(jnp.finfo(jnp.float32).tiny)


class LabelIndicator(dist.Distribution):
    """The one-hot indicator ``e_c`` of a label ``c ~ Cat(probs)``; event shape ``(C,)``.

    ``log_prob(v) = sum_c v_c log probs_c`` is linear in ``v``: at a one-hot
    ``v`` it is ``log probs_c``; at ``v = E[e_c]`` it is ``E[log probs_c]``.
    With ``expected=True`` a draw *is* that expectation, ``probs`` itself (a
    differentiable function of the guide's parameters), which turns any
    objective linear in the indicator into its exact expectation over ``c``.
    """

    arg_constraints = {"probs": constraints.simplex}
    support = constraints.simplex

    def __init__(self, probs, expected: bool = False, *, validate_args=None):
        self.probs = probs
        self.expected = expected
        super().__init__(batch_shape=jnp.shape(probs)[:-1], event_shape=jnp.shape(probs)[-1:],
                         validate_args=validate_args)

    @property
    def has_rsample(self) -> bool:
        return self.expected

    def sample(self, key, sample_shape=()):
        shape = sample_shape + self.batch_shape + self.event_shape
        if self.expected:
            return jnp.broadcast_to(self.probs, shape)
        logits = jnp.log(jnp.clip(self.probs, _TINY))
        codes = jax.random.categorical(key, logits, shape=sample_shape + self.batch_shape)
        return jax.nn.one_hot(codes, self.event_shape[0])

    def log_prob(self, value):
        return jnp.sum(value * jnp.log(jnp.clip(self.probs, _TINY)), axis=-1)


class LabelWeighted(dist.Distribution):
    """``log_prob(z) = sum_c w_c log p_c(z)``: a label's component, weighted by its indicator.

    Args:
      weights: ``(..., C)`` the label indicator (one-hot, or its expectation).
      components: ``C`` distributions with batch shape ``(C, ...)``.

    At a one-hot ``w`` this is the density of the label's component, which is
    also what :meth:`sample` draws from.
    """

    support = constraints.real_vector

    def __init__(self, weights, components: dist.Distribution, *, validate_args=None):
        self.weights = jnp.moveaxis(weights, -1, 0)  # (C, ...), aligned with the components
        self.components = components
        super().__init__(batch_shape=components.batch_shape[1:],
                         event_shape=components.event_shape, validate_args=validate_args)

    def sample(self, key, sample_shape=()):
        key_label, key_value = jax.random.split(key)
        logits = jnp.log(jnp.clip(jnp.moveaxis(self.weights, 0, -1), _TINY))
        label = jax.random.categorical(key_label, logits, shape=sample_shape + self.batch_shape)
        values = self.components.sample(key_value, sample_shape)  # (S..., C, ..., K)
        values = jnp.moveaxis(values, len(sample_shape), -1)  # (S..., ..., K, C)
        return jnp.take_along_axis(values, label[..., None, None], axis=-1)[..., 0]

    def log_prob(self, value):
        label_axis = -len(self.batch_shape) - 1  # of the components' log-densities
        log_probs = self.components.log_prob(
            jnp.expand_dims(value, label_axis - len(self.event_shape)))  # (..., C, *batch)
        return jnp.sum(jnp.where(self.weights > 0, self.weights * log_probs, 0.0), axis=label_axis)


@dataclasses.dataclass(frozen=True)
class SCANVI(SCVI):
    """SCANVI: scVI plus cell-type labels as a discrete latent, for partly labelled data.

    Fit it to data registered with ``labels_key``; cells with a missing label
    or the registry's ``unlabeled_category`` (default ``"Unknown"``) are
    unlabelled.  Warm start from a fitted scVI with :meth:`from_scvi`.

    ``n_latent``, ``n_hidden``, ``n_layers``, ``dropout_rate``, ``likelihood``, ``dispersion``,
    ``latent_library``, ``encode_batch``, ``use_batch_norm``, ``n_epochs_kl_warmup``,
    ``kl_weight``, ``freeze_batch_norm``: as :class:`~lvmzoo.models.scvi.SCVI`
    (``n_layers``, ``n_hidden``, batch norm also for the classifier,
    ``u_encoder`` and ``latent_prior``).

    Args:
      classification_ratio: weight of the mean cross-entropy of the labelled
        cells of a minibatch (scvi-tools' default 50).
      linear_classifier: ``q(c | z)`` is a linear map of ``z`` (otherwise an
        MLP with ``n_layers`` hidden layers, dropout and batch norm).
    """

    classification_ratio: float = 50.0
    linear_classifier: bool = False

    name: ClassVar[str] = "scanvi"

    def __post_init__(self):
        super().__post_init__()
        if not self.classification_ratio >= 0.0:
            raise ValueError(
                f"classification_ratio must be >= 0, got {self.classification_ratio}")

    @classmethod
    def from_scvi(cls, result, **options) -> "SCANVI":
        """A SCANVI with the architecture of a fitted scVI, to warm start from it.

        Fit it with the scVI's parameters as the starting point; the
        classifier, ``u_encoder`` and ``latent_prior`` start fresh::

            model = SCANVI.from_scvi(scvi_result)
            result = lvmzoo.fit(model, labelled_data, initial_params=scvi_result)

        ``labelled_data`` must have the scVI's genes and batches (register the
        same AnnData with ``labels_key``).

        Args:
          result: a fitted :class:`~lvmzoo.models.scvi.SCVI` (a ``FittedModel``).
          options: SCANVI hyperparameters to set (e.g. ``classification_ratio``).
        """
        if type(result.model) is not SCVI:
            raise ValueError(f"SCANVI.from_scvi needs a fitted scvi model, got "
                             f"{result.model.name!r}")
        return cls(**{**dataclasses.asdict(result.model), **options})

    # ------------------------------------------------------------------
    # Generative model
    # ------------------------------------------------------------------

    def model(self, batch: Batch) -> None:
        n_genes = batch.x.shape[-1]
        n_labels = _n_labels(batch)
        theta_table = self._dispersion_table(batch, n_genes)
        library_prior = self._library_prior(batch) if self.latent_library else None
        with cell_plate(batch):
            with self._kl_warmup(batch):
                label = numpyro.sample("label", LabelIndicator(jnp.full(n_labels, 1.0 / n_labels)))
                with _each_label(label):
                    u = numpyro.sample("u", dist.Normal(0.0, 1.0).expand([self.n_latent])
                                       .to_event(1))  # (C, B, K): one u per label
            prior = dist.Normal(*self._latent_prior(u, batch)).to_event(1)
            z = numpyro.sample("z", LabelWeighted(label, prior))
            self._observe_counts(z, batch, theta_table, library_prior)

    def _latent_prior(self, u, batch: Batch):
        """``(loc, scale)`` of ``p(z | u, c)`` for ``u`` ``(C, B, K)``, label ``c`` on axis 0."""
        module = GaussianEncoder(self.n_latent, hidden=self._hidden, batch_norm=self.use_batch_norm,
                                 freeze_batch_norm=self.freeze_batch_norm)
        return self._per_label_network("latent_prior", module, u, batch)

    def _per_label_network(self, name, module, inputs, batch: Batch, dropout: bool = False):
        """``module(inputs, onehot(c))`` for ``inputs`` ``(C, B, K)`` and every label ``c``."""
        labels = jnp.eye(_n_labels(batch))[:, None, :]  # (C, 1, C), broadcast over cells
        network = flax_module(name, module, inputs[:1, :1], labels[:1], mutable=self._mutable,
                              apply_rng=["dropout"] if dropout else None)
        if dropout and batch.training:
            return network(inputs, labels, training=True, rngs={"dropout": numpyro.prng_key()})
        return network(inputs, labels, training=batch.training)

    # ------------------------------------------------------------------
    # Variational family
    # ------------------------------------------------------------------

    def guide(self, batch: Batch) -> None:
        loc, scale = self._encode(batch, "encoder", self.n_latent)
        if self.latent_library:
            library_loc, library_scale = self._encode(batch, "library_encoder", 1)
        with cell_plate(batch):
            z = numpyro.sample("z", dist.Normal(loc, scale).to_event(1))
            if self.latent_library:
                numpyro.sample("log_library", dist.Normal(library_loc[..., 0], library_scale[..., 0]))
            logits = self._classify(z, batch)
            label_probs = _known_labels_certain(jax.nn.softmax(logits), batch)
            u_loc, u_scale = self._encode_u(z, batch)
            with self._kl_warmup(batch):
                label = numpyro.sample("label", LabelIndicator(label_probs, batch.training))
                with _each_label(label):
                    numpyro.sample("u", dist.Normal(u_loc, u_scale).to_event(1))
            if batch.training:
                # A term of the guide's log-density is subtracted from the ELBO: this adds it to the loss.
                numpyro.factor("classification", self._classification_loss(logits, batch))

    def _classify(self, z, batch: Batch):
        """Label logits ``(B, C)`` of ``q(c | z)``; dropout iff training."""
        hidden = () if self.linear_classifier else self._hidden
        module = MLP(hidden=hidden, n_out=_n_labels(batch), dropout_rate=self.dropout_rate,
                     batch_norm=self.use_batch_norm, freeze_batch_norm=self.freeze_batch_norm)
        mutable = None if self.linear_classifier else self._mutable
        classifier = flax_module("classifier", module, z[:1], apply_rng=["dropout"],
                                 mutable=mutable)
        if batch.training:
            return classifier(z, training=True, rngs={"dropout": numpyro.prng_key()})
        return classifier(z, training=False)

    def _encode_u(self, z, batch: Batch):
        """``(loc, scale)`` of ``q(u | z, c)``, each ``(C, B, K)``."""
        module = GaussianEncoder(self.n_latent, hidden=self._hidden, dropout_rate=self.dropout_rate,
                                 batch_norm=self.use_batch_norm,
                                 freeze_batch_norm=self.freeze_batch_norm)
        z = jnp.broadcast_to(z, (_n_labels(batch),) + z.shape)
        return self._per_label_network("u_encoder", module, z, batch, dropout=True)

    def _classification_loss(self, logits, batch: Batch):
        """Per cell ``(B,)``: ``ratio * B / n_labelled * (-log q(y | z))``, 0 if unlabelled.

        Summed over the minibatch and rescaled by the cell plate (``n / B``),
        this adds ``ratio`` times the labelled cells' mean cross-entropy to
        the per-cell loss.
        """
        labelled = batch.labels >= 0
        log_q = jnp.take_along_axis(jax.nn.log_softmax(logits),
                                    jnp.maximum(batch.labels, 0)[:, None], axis=-1)[:, 0]
        n_labelled = jnp.maximum(jnp.sum(labelled), 1)
        weight = self.classification_ratio * batch.size / n_labelled
        return jnp.where(labelled, -weight * log_q, 0.0)

    # ------------------------------------------------------------------
    # Outputs
    # ------------------------------------------------------------------

    def predict_proba(self, params, batch: Batch) -> jax.Array:
        """``q(c | z = E[z | x])``, ``(B, C)``, networks in evaluation mode."""
        batch = batch.replace(training=False)

        def classify():
            z_loc, _ = self._encode(batch, "encoder", self.n_latent)
            return jax.nn.softmax(self._classify(z_loc, batch))

        return _with_params(classify, params)()

    def annotate(self, adata, params, latent, data) -> list[str]:
        """Adds ``obs["scanvi_prediction"]`` (label) and ``obs["scanvi_probability"]``; scVI's
        layer comes from :meth:`annotate_per_gene`."""
        import pandas as pd

        keys = super().annotate(adata, params, latent, data)
        probs = label_probabilities(self, params, data)
        categories = list(data.registry.label_categories)
        adata.obs[PREDICTION_OBS] = pd.Categorical.from_codes(probs.argmax(1), categories)
        adata.obs[PROBABILITY_OBS] = probs.max(1).astype(np.float32)
        return [*keys, f'obs["{PREDICTION_OBS}"]', f'obs["{PROBABILITY_OBS}"]']


def label_probabilities(model, params, data, chunk: int = 1024) -> np.ndarray:
    """``(n_cells, C)`` predicted label probabilities of every cell of ``data``.

    The cells are taken ``chunk`` at a time (:class:`~lvmzoo.data.streaming.
    EvaluationBatches`): cells on disk are read a chunk at a time, so memory
    holds a chunk of cells and the ``n_cells × C`` result, never the matrix; the
    probabilities equal those of the same cells in memory (evaluation mode:
    each cell's prediction depends on that cell only).
    """
    from lvmzoo.data.streaming import EvaluationBatches

    return np.concatenate([np.asarray(_predict_program(model, params, batch))
                           for batch in EvaluationBatches(data, chunk)])


@functools.partial(jax.jit, static_argnames=("model",))
def _predict_program(model, params, batch):
    return model.predict_proba(params, batch)


def _n_labels(batch: Batch) -> int:
    if batch.n_labels < 1:
        raise ValueError("scanvi needs cell labels: register the data with labels_key= "
                         "(unlabelled cells may have a missing label or the unlabeled_category)")
    return batch.n_labels


def _known_labels_certain(probs, batch: Batch):
    """``q(c | z)`` for unlabelled cells, the one-hot known label for labelled ones."""
    known = jax.nn.one_hot(jnp.maximum(batch.labels, 0), probs.shape[-1])
    return jnp.where((batch.labels >= 0)[:, None], known, probs)


def _each_label(label):
    """One value per label (plate on dim -2), each weighted by the label indicator ``(B, C)``.

    The mask drops labels of weight 0 (a labelled cell's other labels) exactly;
    NumPyro refuses a concrete scale of 0, hence the floor under the mask.
    """
    weights = jnp.moveaxis(label, -1, 0)  # (C, B)
    stack = contextlib.ExitStack()
    stack.enter_context(numpyro.plate("labels", weights.shape[0], dim=-2))
    stack.enter_context(handlers.mask(mask=weights > 0))
    stack.enter_context(handlers.scale(scale=jnp.maximum(weights, _TINY)))
    return stack

