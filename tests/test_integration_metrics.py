"""Integration metrics (``lvmzoo.analysis.integration``) against their definitions and peers.

One small constructed data set: 3 well-separated labels × 2 batches, 80 cells
per label, and three embeddings — ``X_mixed`` (batches assigned independently
of position: perfectly mixed), ``X_separated`` (the same plus a large shift per
batch: batches fully separated within every label) and ``X_pca`` (computed from
counts that carry label programs and a batch effect).  One ``benchmark`` run is
shared by the tests; the definitions are checked with independent numpy /
scikit-learn / scipy code and against scib-metrics' own functions.
"""

import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy.spatial.distance import cdist
from scipy.stats import chi2
from sklearn.decomposition import PCA
from sklearn.metrics import silhouette_samples, silhouette_score

import scib_metrics
from lvmzoo import cli
from lvmzoo.analysis import integration
from lvmzoo.data.registry import DataError
from lvmzoo.data.transforms import apply_transform

N_PER_LABEL, N_LABELS, N_BATCHES, N_GENES = 80, 3, 2, 60


def _constructed_adata(seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(N_LABELS), N_PER_LABEL)
    # Equal batches in every label, independent of position: perfectly mixed.
    batches = np.concatenate([rng.permutation(np.arange(N_PER_LABEL) % N_BATCHES)
                              for _ in range(N_LABELS)])
    n = len(labels)
    centres = 12.0 * np.eye(N_LABELS, 6)
    mixed = centres[labels] + rng.normal(size=(n, 6))
    separated = mixed + 12.0 * batches[:, None] * np.eye(6)[N_LABELS]
    programs = rng.normal(0, 1.0, (N_LABELS, N_GENES))
    batch_effect = rng.normal(0, 0.7, (N_BATCHES, N_GENES))
    rate = np.exp(1.0 + programs[labels] + batch_effect[batches])
    adata = ad.AnnData(
        X=sp.csr_matrix(rng.poisson(rate).astype(np.float32)),
        obs=pd.DataFrame({"batch": pd.Categorical([f"b{b}" for b in batches]),
                          "label": pd.Categorical([f"type{k}" for k in labels])},
                         index=[f"cell{i}" for i in range(n)]),
    )
    adata.obsm["X_mixed"] = mixed.astype(np.float32)
    adata.obsm["X_separated"] = separated.astype(np.float32)
    return adata


@pytest.fixture(scope="module")
def adata():
    return _constructed_adata()


@pytest.fixture(scope="module")
def run(adata):
    """``(table, adata before the call)`` of one default benchmark."""
    before = adata.copy()
    table = integration.benchmark(adata, "batch", "label", ["X_mixed", "X_separated", "X_pca"])
    return table, before


@pytest.fixture(scope="module")
def codes(adata):
    return (adata.obs["label"].cat.codes.to_numpy(), adata.obs["batch"].cat.codes.to_numpy())


# --------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------


def test_table_rows_columns_and_aggregate_formula(run):
    table, _ = run
    assert list(table.index) == ["X_mixed", "X_separated", "X_pca"]
    assert table.index.name == "embedding"
    assert list(table.columns) == [*integration.DEFAULT_METRICS, *integration.AGGREGATES]
    kinds = {m: integration.METRICS[m].kind for m in integration.DEFAULT_METRICS}
    bio = [m for m, kind in kinds.items() if kind == "bio_conservation"]
    batch = [m for m in integration.DEFAULT_METRICS if m not in bio]
    assert bio == ["isolated_labels", "nmi", "ari", "silhouette_label", "clisi"]
    np.testing.assert_allclose(table["bio_conservation"], table[bio].mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(table["batch_correction"], table[batch].mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(
        table["total"], 0.6 * table["bio_conservation"] + 0.4 * table["batch_correction"],
        rtol=1e-12)
    assert table.notna().all().all()
    assert table.attrs["n_batches"] == 2 and table.attrs["n_labels"] == 3
    assert table.attrs["scib_metrics"] == scib_metrics.__version__


def test_aggregate_scores_skip_missing_metrics():
    table = pd.DataFrame({"ilisi": [0.5, 0.2], "nmi": [1.0, 0.4], "ari": [np.nan, 0.6],
                          "note": ["a", "b"]}, index=["e1", "e2"])
    out = integration.aggregate_scores(table)
    assert list(out.columns) == ["nmi", "ari", "ilisi", *integration.AGGREGATES]
    np.testing.assert_allclose(out["bio_conservation"], [1.0, 0.5])
    np.testing.assert_allclose(out["batch_correction"], [0.5, 0.2])
    np.testing.assert_allclose(out["total"], [0.8, 0.38])
    only_bio = integration.aggregate_scores(table[["nmi"]])
    assert "total" not in only_bio and "batch_correction" not in only_bio


def test_mixed_batches_score_high_and_separated_low(run):
    table, _ = run
    mixed, separated = table.loc["X_mixed"], table.loc["X_separated"]
    assert mixed["ilisi"] > 0.85 and separated["ilisi"] < 0.02
    assert mixed["kbet"] > 0.8 and separated["kbet"] < 0.05
    assert mixed["bras"] > 0.9 and separated["bras"] < 0.6
    # Each label is one blob when mixed, two equal far-apart blobs when separated
    # (a directed kNN graph may leave an outlying cell or two unreached).
    assert mixed["graph_connectivity"] > 0.95
    assert 0.45 < separated["graph_connectivity"] <= 0.5 + 1e-12
    # The labels are three well-separated blobs: k-means recovers them.
    assert mixed["nmi"] == pytest.approx(1.0) and mixed["ari"] == pytest.approx(1.0)
    assert mixed["clisi"] == pytest.approx(1.0, abs=1e-4)      # float32 kernel weights
    assert separated["clisi"] == pytest.approx(1.0, abs=1e-4)
    assert mixed["silhouette_label"] > 0.8
    assert mixed["batch_correction"] > separated["batch_correction"] + 0.4
    assert mixed["total"] > separated["total"]


def test_pcr_comparison_is_zero_for_the_unintegrated_embedding(run):
    table, _ = run
    assert table.loc["X_pca", "pcr_comparison"] == 0.0
    assert table.loc["X_mixed", "pcr_comparison"] > 0.9      # batch variance removed
    assert table.loc["X_separated", "pcr_comparison"] == 0.0  # increased: clipped to 0


# --------------------------------------------------------------------------
# Metrics against their definitions and peers
# --------------------------------------------------------------------------


def _lisi_reference(distances, indices, groups, perplexity):
    """Harmony's LISI: inverse Simpson index of groups under a Gaussian kernel of
    the neighbour distances whose entropy is log(perplexity), self excluded
    (every cell is its own first neighbour here)."""
    d, idx = distances[:, 1:].astype(np.float64), indices[:, 1:]
    d = d - d.min(1, keepdims=True)
    lo, hi = np.full(len(d), -20.0), np.full(len(d), 20.0)   # bisection on log(beta)
    for _ in range(100):
        p = np.exp(-np.exp((lo + hi) / 2)[:, None] * d)
        p /= p.sum(1, keepdims=True)
        entropy = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), 1)
        wide = entropy > np.log(perplexity)
        lo, hi = np.where(wide, (lo + hi) / 2, lo), np.where(wide, hi, (lo + hi) / 2)
    one_hot = np.eye(groups.max() + 1)[groups[idx]]          # (cells, neighbours, groups)
    shares = np.einsum("cn,cng->cg", p, one_hot)
    return 1 / np.sum(shares ** 2, 1)


def test_lisi_matches_harmonys_definition(run, adata, codes):
    rng = np.random.default_rng(3)
    n = adata.n_obs  # the shapes of the shared run: scib-metrics' kernels are compiled
    x = rng.normal(size=(n, 4)).astype(np.float32)
    groups = rng.integers(0, 3, n)
    knn = integration.neighbors(x, 90)
    expected = _lisi_reference(knn.distances, knn.indices, groups, perplexity=30)
    np.testing.assert_allclose(scib_metrics.lisi_knn(knn, groups), expected, rtol=2e-3)
    # iLISI before scaling: ~ the number of batches when mixed, 1 when separated.
    _, batches = codes
    for key, low, high in [("X_mixed", 1.85, 2.0), ("X_separated", 1.0, 1.01)]:
        knn = integration.neighbors(adata.obsm[key], 90)
        assert low <= np.median(scib_metrics.lisi_knn(knn, batches)) <= high, key


def test_silhouette_label_is_rescaled_sklearn_silhouette(run, adata, codes):
    table, _ = run
    labels, _ = codes
    for key in ("X_mixed", "X_separated"):
        expected = (silhouette_score(adata.obsm[key], labels) + 1) / 2
        assert table.loc[key, "silhouette_label"] == pytest.approx(expected, abs=1e-5)


def _bras_reference(x, labels, batches):
    """BRAS from its definition: cosine distances, mean distance to all other batches."""
    scores = []
    for label in np.unique(labels):
        xs, bs = x[labels == label], batches[labels == label]
        d = cdist(xs, xs, "cosine")
        s = np.empty(len(xs))
        for i in range(len(xs)):
            same = (bs == bs[i]) & (np.arange(len(xs)) != i)
            a, b = d[i, same].mean(), d[i, bs != bs[i]].mean()
            s[i] = (b - a) / max(a, b)
        scores.append(np.mean(1 - np.abs(s)))
    return np.mean(scores)


def _silhouette_batch_reference(x, labels, batches):
    """scIB silhouette batch: scikit-learn's silhouette of batches within each label."""
    return np.mean([np.mean(1 - np.abs(silhouette_samples(x[labels == k], batches[labels == k])))
                    for k in np.unique(labels)])


def test_batch_silhouettes_match_definition_and_scib_metrics(run, adata, codes):
    table, _ = run
    labels, batches = codes
    for key in ("X_mixed", "X_separated"):
        x = adata.obsm[key]
        assert table.loc[key, "bras"] == pytest.approx(_bras_reference(x, labels, batches),
                                                       abs=1e-4)
        assert table.loc[key, "bras"] == pytest.approx(scib_metrics.bras(x, labels, batches),
                                                       abs=1e-5)
    x = adata.obsm["X_separated"]
    ours = integration._batch_silhouette(x, labels, batches, metric="euclidean",
                                         between="nearest")
    assert ours == pytest.approx(_silhouette_batch_reference(x, labels, batches), abs=1e-4)
    assert ours == pytest.approx(scib_metrics.silhouette_batch(x, labels, batches), abs=1e-5)


def test_batch_silhouette_is_nan_without_a_label_in_two_batches():
    x = np.random.default_rng(0).normal(size=(20, 3)).astype(np.float32)
    labels = np.repeat([0, 1], 10)
    assert np.isnan(integration._batch_silhouette(x, labels, labels, metric="cosine",
                                                  between="mean_other"))


@pytest.mark.parametrize("n_batches", [2, 3])
def test_kbet_acceptance_is_the_chi_square_test(n_batches):
    rng = np.random.default_rng(5)
    n, k = 80, 11                                   # a label's size and k0 + 1 in the run
    batches = rng.integers(0, n_batches, n)
    batches[:30] = 0                                # uneven batch sizes
    indices = np.concatenate([np.arange(n)[:, None], rng.integers(0, n, (n, k - 1))], 1)
    indices[:20] = np.arange(k)[None, :]            # some neighbourhoods of batch 0 only
    freq = np.bincount(batches) / n
    rejected = []
    for row in indices:
        observed = np.bincount(batches[row], minlength=n_batches)
        statistic = np.sum((observed - k * freq) ** 2 / (k * freq))
        rejected.append(chi2.sf(statistic, df=n_batches - 1) < 0.05)
    expected = 1 - np.mean(rejected)
    assert 0.1 < expected < 0.9
    assert integration.kbet_acceptance(indices, batches) == pytest.approx(expected, abs=1e-12)
    knn = scib_metrics.nearest_neighbors.NeighborsResults(
        indices=indices, distances=np.zeros(indices.shape, np.float32))
    assert integration.kbet_acceptance(indices, batches) == pytest.approx(
        scib_metrics.kbet(knn, batches)[0], abs=1.5 / n)   # float32 p-values at the threshold


def test_kbet_per_label_matches_scib_metrics_given_the_same_neighbour_search(
        adata, codes, monkeypatch):
    # scib-metrics searches diffusion-map neighbours with pynndescent (approximate,
    # ~75 s of numba compilation); give it the exact search this module uses.
    monkeypatch.setattr(scib_metrics.nearest_neighbors, "pynndescent",
                        lambda x, n_neighbors, **_: integration.neighbors(x, n_neighbors))
    labels, batches = codes
    for key in ("X_mixed", "X_separated"):
        knn = integration.neighbors(adata.obsm[key], 50)
        ours = integration._kbet_per_label(knn, batches, labels)
        theirs = scib_metrics.kbet_per_label(knn, batches, labels)
        assert ours == pytest.approx(theirs, abs=0.01), key


def test_umap_connectivities_match_umap_learn():
    from umap.umap_ import fuzzy_simplicial_set

    rng = np.random.default_rng(2)
    x = rng.normal(size=(120, 4)).astype(np.float32)
    x[:5] = x[0]                                    # duplicates: zero distances
    knn = integration.neighbors(x, 15)
    ours = integration.umap_connectivities(knn.indices, knn.distances)
    theirs = fuzzy_simplicial_set(sp.coo_matrix((120, 1)), 15, None, None,
                                  knn_indices=knn.indices, knn_dists=knn.distances)[0]
    assert abs(ours - theirs.tocsr()).max() < 1e-6
    assert (ours != ours.T).nnz == 0


def test_graph_connectivity_counts_the_largest_component_per_label():
    # Cells on a line, 1 apart (jittered); label 2 in two pieces of 20 and 10 cells.
    rng = np.random.default_rng(4)
    position = np.concatenate([np.arange(30), 1000 + np.arange(30), 2000 + np.arange(20),
                               3000 + np.arange(10)]) + rng.uniform(-0.1, 0.1, 90)
    x = np.stack([position, np.zeros(90)], 1).astype(np.float32)
    labels = np.repeat([0, 1, 2], 30)
    knn = integration.neighbors(x, 5)
    # Label 0 and 1: one component each; label 2: 20 of 30 cells in the largest.
    assert scib_metrics.graph_connectivity(knn, labels) == pytest.approx((1 + 1 + 2 / 3) / 3)


def test_leiden_clustering_recovers_separated_labels(adata):
    table = integration.benchmark(adata, "batch", "label", ["X_mixed"], metrics=["nmi", "ari"],
                                  clustering="leiden")
    assert list(table.columns) == ["nmi", "ari", "bio_conservation"]
    assert table.loc["X_mixed", "nmi"] == pytest.approx(1.0)
    assert table.loc["X_mixed", "ari"] == pytest.approx(1.0)


# --------------------------------------------------------------------------
# X_pca, the user's AnnData, errors
# --------------------------------------------------------------------------


def test_x_pca_is_computed_and_the_anndata_untouched(run, adata):
    table, before = run
    assert table.attrs["x_pca"] == "computed: 50 principal components of log1p_cp10k(X)"
    assert list(adata.obsm) == list(before.obsm) == ["X_mixed", "X_separated"]
    assert (adata.X != before.X).nnz == 0
    pd.testing.assert_frame_equal(adata.obs, before.obs)
    for key in adata.obsm:
        np.testing.assert_array_equal(adata.obsm[key], before.obsm[key])
    assert not adata.uns and not adata.obsp


def test_pca_embedding_is_pca_of_log_normalised_counts(adata):
    pcs, description = integration.pca_embedding(adata, n_pcs=10)
    dense = apply_transform("log1p_cp10k", adata.X.toarray().astype(np.float64))
    expected = PCA(10, svd_solver="full").fit_transform(dense)
    for j in range(10):  # equal up to the sign of each component
        assert abs(np.corrcoef(pcs[:, j], expected[:, j])[0, 1]) > 0.9999, j
    assert description == "computed: 10 principal components of log1p_cp10k(X)"
    normalised = adata.copy()
    normalised.X = sp.csr_matrix(dense)
    _, description = integration.pca_embedding(normalised, n_pcs=5)
    assert description == "computed: 5 principal components of X"  # not counts: as is


def _with(adata, **changes):
    out = adata.copy()
    for name, value in changes.items():
        if name.startswith("obs_"):
            out.obs[name[4:]] = value
        else:
            out.obsm[name] = value
    return out


ERRORS = {
    "unknown batch key": (dict(batch_key="donor"),
                          "batch_key 'donor' is not a column of adata.obs"),
    "unknown labels key": (dict(labels_key="cell_type"),
                           "labels_key 'cell_type' is not a column of adata.obs"),
    "unknown embedding": (dict(embeddings=["X_scvi"]),
                          "'X_scvi' not in adata.obsm; available: X_mixed, X_separated"),
    "one batch": (dict(adata=lambda a: _with(a, obs_batch="b0")),
                  "has 1 distinct value(s); integration metrics need at least 2 batches"),
    "one label": (dict(adata=lambda a: _with(a, obs_label="t")),
                  "need at least 2 labels"),
    "missing labels": (dict(adata=lambda a: _with(a, obs_label=pd.Categorical(
        ["t0"] * (a.n_obs - 1) + [None]))), "obs['label'] has 1 missing values"),
    "NaN embedding": (dict(adata=lambda a: _with(a, X_nan=np.full((a.n_obs, 2), np.nan)),
                           embeddings=["X_nan"]), "obsm['X_nan'] has non-finite"),
    "unknown metric": (dict(metrics=["lisi"]), "unknown metric(s) 'lisi'; choose from"),
    "unknown clustering": (dict(clustering="louvain"), "unknown clustering 'louvain'"),
    "pcr without baseline": (dict(pre_integrated=None),
                             "pcr_comparison compares against an unintegrated embedding"),
    "unknown baseline": (dict(pre_integrated="X_raw"), "pre_integrated 'X_raw' is not in"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_input_is_a_data_error_naming_the_fix(adata, case):
    changes, message = ERRORS[case]
    kwargs = dict(adata=adata, batch_key="batch", labels_key="label", embeddings=["X_mixed"],
                  metrics=["graph_connectivity", "pcr_comparison"])
    kwargs.update(changes)
    if callable(kwargs["adata"]):
        kwargs["adata"] = kwargs["adata"](adata)
    with pytest.raises(DataError) as err:
        integration.benchmark(**kwargs)
    assert message in str(err.value)


# --------------------------------------------------------------------------
# Markdown, figure, command line
# --------------------------------------------------------------------------


def test_markdown_table_and_figure(run, tmp_path):
    table, _ = run
    markdown = integration.markdown_table(table).splitlines()
    assert markdown[0].startswith("| embedding | Isolated labels | NMI | ARI |")
    assert markdown[0].endswith("| Bio conservation | Batch correction | Total |")
    assert markdown[2].startswith("| X_mixed | ")
    assert f"| {table.loc['X_mixed', 'total']:.3f} |" in markdown[2]
    figure = integration.integration_figure(table, title="t")
    ax = figure.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == list(table.index)
    assert [t.get_text() for t in ax.get_xticklabels()][-1] == "Total"
    path = integration.save_integration_figure(table, tmp_path / "f.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["f.png"]


@pytest.fixture(scope="module")
def h5ad(adata, tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "cells.h5ad"
    adata.write_h5ad(path)
    return path


def test_cli_writes_table_markdown_and_figure(run, h5ad, tmp_path, capsys):
    out = tmp_path / "metrics"
    rc = cli.main(["integration-metrics", str(h5ad), "--batch-key", "batch", "--labels-key",
                   "label", "--embeddings", "X_mixed,X_separated,X_pca", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert sorted(p.name for p in out.iterdir()) == [
        "integration_metrics.csv", "integration_metrics.md", "integration_metrics.png"]
    written = pd.read_csv(out / "integration_metrics.csv", index_col="embedding")
    pd.testing.assert_frame_equal(written, run[0], check_exact=False, atol=1e-6)
    assert (out / "integration_metrics.md").read_text() == integration.markdown_table(run[0])
    assert "integration metrics of 3 embedding(s) on" in captured.out
    assert "240 cells, 2 batches (batch), 3 labels (label)" in captured.out


def test_cli_runs_on_the_bundled_fixture_by_default(tmp_path, capsys):
    rc = cli.main(["integration-metrics", "--out", str(tmp_path), "--metrics",
                   "graph_connectivity"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "bundled 'wu2020' data set: 200 cells, 14 batches (patient), 16 labels " \
           "(cluster_orig)" in captured.out
    table = pd.read_csv(tmp_path / "integration_metrics.csv", index_col="embedding")
    assert list(table.index) == ["X_pca"]
    assert list(table.columns) == ["graph_connectivity", "batch_correction"]
    assert 0 < table.loc["X_pca", "graph_connectivity"] <= 1


CLI_ERRORS = {
    "no keys with DATA": (["--embeddings", "X_mixed"], "--batch-key is required with DATA"),
    "unknown batch key": (["--batch-key", "donor", "--labels-key", "label"],
                          "batch_key 'donor' is not a column of adata.obs"),
    "unknown embedding": (["--batch-key", "batch", "--labels-key", "label", "--embeddings",
                           "X_mixed,X_scvi"], "'X_scvi' not in adata.obsm"),
    "unknown metric": (["--batch-key", "batch", "--labels-key", "label", "--metrics", "f1"],
                       "unknown metric(s) 'f1'"),
    "bad clustering": (["--batch-key", "batch", "--labels-key", "label", "--clustering", "x"],
                       "argument --clustering: invalid choice"),
}


@pytest.mark.parametrize("case", list(CLI_ERRORS))
def test_cli_errors_are_one_line_exit_2(case, h5ad, tmp_path, capsys):
    argv, message = CLI_ERRORS[case]
    rc = cli.main(["integration-metrics", str(h5ad), "--out", str(tmp_path / "o"), *argv])
    captured = capsys.readouterr()
    assert rc == 2
    assert captured.err.count("\n") == 1 and captured.err.startswith("lvmzoo: error: ")
    assert message in captured.err


def test_cli_names_the_extra_when_scib_metrics_is_missing(h5ad, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "scib_metrics", None)  # import scib_metrics fails
    rc = cli.main(["integration-metrics", str(h5ad), "--batch-key", "batch", "--labels-key",
                   "label", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert rc == 2
    assert captured.err.count("\n") == 1
    assert "install them with pip install 'lvmzoo[integration]'" in captured.err


def test_cli_help_explains_every_option(capsys):
    assert cli.main(["integration-metrics", "--help"]) == 0
    printed = capsys.readouterr().out
    for option in ("DATA", "--batch-key", "--labels-key", "--embeddings", "--out", "--metrics",
                   "--clustering", "--pre-integrated", "--layer", "--n-pcs", "--seed",
                   "wu2020", "lvmzoo[integration]", "silhouette_batch"):
        assert option in printed, option
