"""Fixtures shared by several test modules, built once per session.

``labelled_simulation``: a simulated 600 cells × 150 genes in 3 batches (4 cell
types, a strong batch effect).  batch0 and batch1 are the *reference*, where
10 % of the cells keep their cell type in ``obs["label"]`` and the others are
``"Unknown"``; batch2 is the *query*, measured on a slightly different panel:
15 of the reference's genes missing and 5 genes of its own.

``scanvi_reference``: SCANVI (``encode_batch=True``) fitted to the reference
(one compiled fit), used
by tests/test_scanvi.py (label transfer) and tests/test_query.py (mapping).
"""

import os
from pathlib import Path


def _one_share_of_the_cores_per_worker() -> None:
    """Pin each xdist worker to its own share of the cores, before jax starts.

    XLA sizes its CPU thread pools by the cores a process may run on; two workers
    on two cores otherwise run two pools of two threads each, which spin while
    waiting and take cores from each other (in the cold suite a SCANVI test took 247 s
    against 43 s alone on one core). Pinned, each worker's XLA uses its own cores.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    n_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker.startswith("gw") or n_workers < 2 or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) >= n_workers:
        os.sched_setaffinity(0, cores[int(worker[2:]) % n_workers::n_workers])


_one_share_of_the_cores_per_worker()

import anndata as ad  # noqa: E402  (after the pinning: jax starts with the worker's cores)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import scipy.sparse as sp  # noqa: E402

import lvmzoo  # noqa: E402
from lvmzoo import datasets  # noqa: E402

# How the two xdist workers share the suite (``--dist loadgroup`` in pyproject.toml): test by
# test, in the order below: modules heaviest first (the notebooks, each about a minute, among
# them), so that no long test starts last while the other worker idles.  A module's tests run
# on both workers, so a module fixture may be built twice (about 50 s of the suite's ~3,170
# worker-seconds).  Earlier this hook also marked each module as one ``xdist_group``, meant to
# keep a module on one worker; it never took effect (xdist's worker plugin reads the marks in
# its own collection hook, which runs before this conftest's), and the cold suite of 2026-12-07
# ended on the two workers 4 s apart (1,587 / 1,583 s), so the marks were dropped, not fixed.
# Measured worker-seconds per module in that run (``--durations=0``, setup included); a
# module not listed counts as light.
MODULE_SECONDS = {
    "test_check_model.py": 375, "test_real_data.py": 196, "test_scanvi.py": 156,
    "test_pseudotime.py": 155, "test_totalvi.py": 152, "test_scvi.py": 147,
    "test_author_bugs.py": 125, "test_scale.py": 121, "test_ensembles.py": 121,
    "test_guides.py": 104, "test_mcmc_diagnostics.py": 98, "test_gmm_prior.py": 92,
    "test_defaults.py": 81, "test_user_models.py": 75, "test_compare.py": 69,
    "test_perturbation.py": 68, "test_driver.py": 65, "test_fit_outputs.py": 61,
}
NOTEBOOK_SECONDS = 60


def pytest_collection_modifyitems(config, items):
    def weight(item) -> tuple[str, float]:
        module = Path(str(item.fspath)).name
        if module == "test_notebooks.py":
            return item.nodeid, NOTEBOOK_SECONDS
        return module, MODULE_SECONDS.get(module, 0)

    first_seen = {}
    for position, item in enumerate(items):
        name, seconds = weight(item)
        first_seen.setdefault(name, (-seconds, position))
    items.sort(key=lambda item: first_seen[weight(item)[0]])


LABEL_FRACTION = 0.1
QUERY_BATCH = "batch2"


@pytest.fixture(scope="session")
def labelled_simulation():
    adata = datasets.simulate_counts(n_cells=600, n_genes=150, n_batches=3,
                                     batch_effect_scale=0.8, seed=3)
    reference = adata[adata.obs["batch"] != QUERY_BATCH].copy()
    labelled = np.random.default_rng(0).random(reference.n_obs) < LABEL_FRACTION
    reference.obs["label"] = np.where(labelled, reference.obs["cell_type"].astype(str), "Unknown")
    query = adata[adata.obs["batch"] == QUERY_BATCH].copy()
    rng = np.random.default_rng(0)
    kept = np.sort(rng.permutation(query.n_vars)[15:])
    extra = ad.AnnData(sp.csr_matrix(rng.poisson(1.0, (query.n_obs, 5)).astype(np.float32)),
                       obs=query.obs[[]], var=pd.DataFrame(index=[f"new{i}" for i in range(5)]))
    query = ad.concat([query[:, kept], extra], axis=1, merge="first")
    query.obs = adata.obs.loc[query.obs_names, ["batch", "cell_type"]].copy()
    return reference, query, labelled


@pytest.fixture(scope="session")
def scanvi_reference(labelled_simulation):
    from lvmzoo.models import SCANVI

    reference, _, _ = labelled_simulation
    data = lvmzoo.setup_anndata(reference, batch_key="batch", labels_key="label")
    # encode_batch: the query's batch enters the encoder too, so mapping can correct its latent.
    model = SCANVI(n_hidden=32, n_latent=8, n_epochs_kl_warmup=50, encode_batch=True)
    return lvmzoo.fit(model, data, epochs=100, batch_size=128, progress=False), data
