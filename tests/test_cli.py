"""The ``lvmzoo`` command line, run in-process through ``main``."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import lvmzoo
from lvmzoo import cli, datasets, io
from lvmzoo.infer import svi


@pytest.fixture(scope="module")
def fit_run(tmp_path_factory):
    """One tiny ``lvmzoo fit ppca`` on the bundled data, shared by the tests below."""
    out = tmp_path_factory.mktemp("fit") / "run"
    capture = _Capture()
    with capture:
        rc = cli.main(["fit", "ppca", "--out", str(out), "--epochs", "2", "--no-progress",
                       "--plot-method", "pca", "--n-latent", "3", "--batch-size", "512",
                       "--seed", "1"])
    return out, rc, capture.out, capture.err


def test_fit_writes_every_output(fit_run):
    out, rc, stdout, stderr = fit_run
    assert rc == 0, stderr
    for name in ("history.json", "loss.png", "result.h5ad", "metrics.json"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "model").iterdir()) == sorted(io.RUN_FILES)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ppca fitted to bundled data set 'mouse_10k': 9,999 cells × 715 genes" in stdout
    assert 'obsm["X_ppca"]' in stdout
    assert not list(out.glob(".*"))  # no temporary files left behind


def test_fit_history_and_saved_model(fit_run):
    out = fit_run[0]
    history = json.loads((out / "history.json").read_text())
    assert len(history["loss"]) == len(history["validation_loss"]) == 2
    assert len(history["seconds"]) == 2 and history["compile_seconds"] > 0
    fitted = lvmzoo.load_model(out / "model")
    assert fitted.model == lvmzoo.models.PPCA(n_latent=3)
    assert fitted.seed == 1
    assert fitted.history["loss"] == history["loss"]
    assert fitted.registry.transform == "log1p_cp10k"  # PPCA's default for counts


def test_fit_result_h5ad_adds_only_the_latent(fit_run):
    out = fit_run[0]
    original = datasets.load(datasets.DEFAULT_DATASET)
    result = ad.read_h5ad(out / "result.h5ad")
    assert set(result.obsm) - set(original.obsm) == {"X_ppca"}
    assert result.obsm["X_ppca"].shape == (original.n_obs, 3)
    for attr in ("layers", "uns", "varm", "obsp", "varp"):
        assert set(getattr(result, attr)) == set(getattr(original, attr)), attr
    pd.testing.assert_frame_equal(result.obs, original.obs)
    pd.testing.assert_frame_equal(result.var, original.var)
    assert (result.X != original.X).nnz == 0
    # The stored latent is the saved model's latent of those cells.
    fitted = lvmzoo.load_model(out / "model")
    data = lvmzoo.setup_anndata(original, transform="log1p_cp10k")
    np.testing.assert_array_equal(result.obsm["X_ppca"], fitted.latent(data))


def test_fit_metrics_json(fit_run):
    out = fit_run[0]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"train", "validation", "post_fit_seconds", "fit_seconds_in_all",
                            "matrix_in_memory"}
    assert metrics["fit_seconds_in_all"] > 0
    # ppca's log-normalised values are not counts: held as anndata's float32 CSR.
    assert metrics["matrix_in_memory"]["format"].startswith("CSR (float32 values")
    assert metrics["matrix_in_memory"]["mib"] > 0
    assert set(metrics["post_fit_seconds"]) == {"save_model", "annotate", "write_result", "plot",
                                                "score"}
    keys = {"n_cells", "avg_log_likelihood", "method", "n_samples", "elbo", "standard_error",
            "n_cells_in_split", "estimator", "sample_avg_log_likelihood"}
    assert set(metrics["train"]) == set(metrics["validation"]) == keys
    # --validation-fraction 0.1 by default; a random 1,000 of the 8,999 training cells scored,
    # their average corrected by regression on the cells' sizes (the cells are in memory)
    assert metrics["train"]["n_cells_in_split"] == 8999
    assert metrics["train"]["n_cells"] == 1000 and metrics["train"]["standard_error"] > 0
    assert metrics["train"]["estimator"].startswith("regression")
    assert metrics["validation"]["estimator"] == "all cells"
    assert metrics["validation"]["standard_error"] == 0.0  # all 1,000 scored
    assert metrics["validation"]["n_cells"] == 1000
    assert metrics["train"]["method"] == "exact"
    assert np.isfinite(metrics["validation"]["avg_log_likelihood"])


def test_evaluate_a_saved_run(fit_run, tmp_path, capsys):
    out = fit_run[0]
    cells = datasets.load(datasets.DEFAULT_DATASET)[:300].copy()
    cells.write_h5ad(tmp_path / "cells.h5ad")
    rc = cli.main(["evaluate", str(out), str(tmp_path / "cells.h5ad"),
                   "--out", str(tmp_path / "m.json")])
    printed = capsys.readouterr().out
    assert rc == 0
    metrics = json.loads(printed)
    assert json.loads((tmp_path / "m.json").read_text()) == metrics
    assert set(metrics) == {"n_cells", "avg_log_likelihood", "method", "n_samples", "elbo"}
    assert metrics["n_cells"] == 300
    # Same numbers as the Python API (the saved transform is re-applied).
    fitted = lvmzoo.load_model(out / "model")
    expected = fitted.evaluate(lvmzoo.query_anndata(cells, fitted.registry))
    assert metrics["avg_log_likelihood"] == pytest.approx(expected["avg_log_likelihood"])


def test_datasets_lists_the_bundled_data(capsys):
    assert cli.main(["datasets"]) == 0
    printed = capsys.readouterr().out
    assert "mouse_10k (default): 9999 cells × 715 genes" in printed
    assert "wu2020: 200 cells × 2599 genes" in printed
    assert "kang_ifnb: 6000 cells × 2039 genes" in printed


HELP = {
    (): ["fit", "evaluate", "de", "perturb", "datasets", "--version"],
    ("fit",): ["MODEL", "DATA", "--out", "--layer", "--batch-key", "--labels-key",
               "--n-latent", "--n-components", "--epochs", "--batch-size", "--lr", "--seed",
               "--no-progress", "--validation-fraction", "--transform", "--kind",
               "--n-hidden", "--n-layers", "--likelihood", "--dispersion", "--latent-library",
               "--dataset", "--exclude", "--perturbation-key", "--covariate-keys", "--dose-key",
               "ppca", "fa", "scvi", "cpa", "log1p_cp10k"],
    ("evaluate",): ["RUN_DIR", "DATA", "--out", "--n-samples", "--seed"],
    ("de",): ["RUN_DIR", "DATA", "--groupby", "--group1", "--group2", "--mode", "--delta",
              "--fdr-target", "--n-samples", "--no-batch-correction", "--seed", "--out",
              "result.h5ad"],
    ("perturb",): ["RUN_DIR", "DATA", "--condition-key", "--control", "--perturbed",
                   "--cell-type-key", "--predict", "--method", "--dose", "--layer",
                   "--n-top-genes", "--seed", "--out", "predicted.h5ad", "metrics.csv",
                   "kang_ifnb"],
    ("datasets",): ["bundled"],
}


@pytest.mark.parametrize("command", list(HELP))
def test_help_mentions_every_option(command, capsys):
    assert cli.main([*command, "--help"]) == 0
    printed = capsys.readouterr().out
    for option in HELP[command]:
        assert option in printed, option


def test_fit_help_lists_every_registered_model(capsys):
    cli.main(["fit", "--help"])
    printed = capsys.readouterr().out
    for name in lvmzoo.models.MODELS:
        assert name in printed


@pytest.fixture
def files(tmp_path):
    (tmp_path / "cells.txt").write_text("gene\tcell1\n")
    (tmp_path / "broken.h5ad").write_text("not hdf5")
    return tmp_path


ERRORS = {
    "missing file": (["fit", "ppca", "{tmp}/nope.h5ad", "--out", "{tmp}/o"],
                     "does not exist"),
    "txt file": (["fit", "ppca", "{tmp}/cells.txt", "--out", "{tmp}/o"],
                 "not an .h5ad file"),
    "unreadable h5ad": (["fit", "ppca", "{tmp}/broken.h5ad", "--out", "{tmp}/o"],
                        "cannot read"),
    "unknown model": (["fit", "pca9", "--out", "{tmp}/o"], "unknown model 'pca9'; choose one of"),
    "unknown batch key": (["fit", "ppca", "--out", "{tmp}/o", "--batch-key", "donor"],
                          "batch_key 'donor' is not a column"),
    "negative epochs": (["fit", "ppca", "--out", "{tmp}/o", "--epochs", "-3"],
                        "--epochs must be at least 1"),
    "validation fraction": (["fit", "ppca", "--out", "{tmp}/o", "--validation-fraction", "1"],
                            "--validation-fraction must be in [0, 1)"),
    "option the model lacks": (["fit", "ppca", "--out", "{tmp}/o", "--n-components", "4"],
                               "model 'ppca' has no --n-components option"),
    "bad number": (["fit", "ppca", "--out", "{tmp}/o", "--epochs", "ten"],
                   "invalid int value: 'ten'"),
    "missing --out": (["fit", "ppca"], "the following arguments are required: --out"),
    "no command": ([], "the following arguments are required: COMMAND"),
    "missing run dir": (["evaluate", "{tmp}/no_run", "{tmp}/cells.txt"],
                        "RUN_DIR {tmp}/no_run is not a directory"),
    "run dir without a model": (["evaluate", "{tmp}", "{tmp}/cells.txt"],
                                "cannot load a model"),
    "option only scvi has": (["fit", "ppca", "--out", "{tmp}/o", "--likelihood", "nb"],
                             "model 'ppca' has no --likelihood option"),
    "negative layers": (["fit", "scvi", "--out", "{tmp}/o", "--n-layers", "-1"],
                        "--n-layers must be at least 0"),
    "unknown dispersion": (["fit", "scvi", "--out", "{tmp}/o", "--dispersion", "cell"],
                           "scvi: unknown dispersion 'cell'; choose one of gene, gene-batch"),
    "de without --groupby": (["de", "{tmp}", "--out", "{tmp}/de.csv"],
                             "the following arguments are required: --groupby"),
    "de delta": (["de", "{tmp}", "--groupby", "g", "--delta", "0", "--out", "{tmp}/de.csv"],
                 "--delta must be positive"),
    "de run dir without a model": (["de", "{tmp}", "--groupby", "g", "--out", "{tmp}/de.csv"],
                                   "cannot load a model"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_user_errors_print_one_line_and_exit_2(case, files, capsys):
    argv, expected = ERRORS[case]
    rc = cli.main([a.format(tmp=files) for a in argv])
    captured = capsys.readouterr()
    assert rc == 2
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("lvmzoo: error: ")
    assert expected.format(tmp=files) in lines[0]
    assert "Traceback" not in captured.err


def test_evaluate_rejects_data_without_the_models_genes(fit_run, tmp_path, capsys):
    cells = datasets.load(datasets.DEFAULT_DATASET)[:50, :100].copy()
    cells.write_h5ad(tmp_path / "few_genes.h5ad")
    rc = cli.main(["evaluate", str(fit_run[0]), str(tmp_path / "few_genes.h5ad")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.splitlines()) == 1
    assert "lacks 615 of the model's 715 genes" in err


def test_a_diverged_fit_is_saved_and_exits_1(fit_run, tmp_path, monkeypatch, capsys):
    last_finite = lvmzoo.load_model(fit_run[0] / "model")

    def diverging_fit(model, data, **kwargs):
        raise svi.FitDivergedError("ppca: the loss became NaN/inf at epoch 1, step 3;\n"
                                   "try a lower learning rate", last_finite)

    monkeypatch.setattr(svi, "fit", diverging_fit)
    rc = cli.main(["fit", "ppca", _small_h5ad(tmp_path), "--out", str(tmp_path / "o"),
                   "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.splitlines() == [err.strip()]  # one line
    assert "loss became NaN/inf at epoch 1, step 3; try a lower learning rate" in err
    np.testing.assert_array_equal(lvmzoo.load_model(tmp_path / "o" / "model").params["W"],
                                  last_finite.params["W"])


def test_an_interrupted_fit_is_saved_and_exits_130(fit_run, tmp_path, monkeypatch, capsys):
    so_far = lvmzoo.load_model(fit_run[0] / "model")
    so_far.interrupted = True
    monkeypatch.setattr(svi, "fit", lambda model, data, **kwargs: so_far)
    # DATA may also follow the options.
    rc = cli.main(["fit", "ppca", "--out", str(tmp_path / "o"), "--no-progress",
                   _small_h5ad(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 130
    assert "interrupted after 2 epochs" in err
    assert lvmzoo.load_model(tmp_path / "o" / "model").interrupted
    assert (tmp_path / "o" / "history.json").is_file()


def test_installed_console_script_runs():
    script = shutil.which("lvmzoo", path=str(Path(sys.executable).parent))
    assert script, "install the package: pip install -e . (declares the lvmzoo script)"
    done = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "fit" in done.stdout and "evaluate" in done.stdout and "datasets" in done.stdout


def _small_h5ad(tmp_path):
    """200 random count cells with every gene observed, as an .h5ad path."""
    rng = np.random.default_rng(0)
    x = rng.poisson(2.0, size=(200, 20)).astype(np.float32) + np.eye(200, 20, dtype=np.float32)
    x[:, 0] += 1
    path = tmp_path / "small.h5ad"
    ad.AnnData(X=sp.csr_matrix(x)).write_h5ad(path)
    return str(path)


class _Capture:
    """Collect stdout/stderr of an in-process run inside a module-scoped fixture."""

    def __enter__(self):
        import contextlib
        import io as stdio

        self._out, self._err = stdio.StringIO(), stdio.StringIO()
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(contextlib.redirect_stdout(self._out))
        self._stack.enter_context(contextlib.redirect_stderr(self._err))
        return self

    def __exit__(self, *exc):
        self._stack.close()
        self.out, self.err = self._out.getvalue(), self._err.getvalue()
        return False


# --------------------------------------------------------------------------
# lvmzoo fit: scvi options; lvmzoo de
# --------------------------------------------------------------------------


def test_scvi_options_reach_only_the_model_fields():
    args = cli.parse_args(cli.build_parser(), [
        "fit", "scvi", "--out", "o", "--likelihood", "nb", "--dispersion", "gene-batch",
        "--n-hidden", "32", "--n-layers", "0", "--latent-library"])
    chosen = cli._hyperparameters(lvmzoo.models.SCVI, args)
    assert chosen == {"likelihood": "nb", "dispersion": "gene-batch", "n_hidden": 32,
                      "n_layers": 0, "latent_library": True}
    assert lvmzoo.models.SCVI(**chosen).latent_library
    args = cli.parse_args(cli.build_parser(), ["fit", "scvi", "--out", "o", "--no-latent-library"])
    assert cli._hyperparameters(lvmzoo.models.SCVI, args) == {"latent_library": False}


@pytest.fixture(scope="module")
def scvi_run(tmp_path_factory):
    """A tiny scvi run laid out as 'lvmzoo fit' writes it (model/, result.h5ad), fitted in-process."""
    out = tmp_path_factory.mktemp("de") / "run"
    adata = datasets.simulate_counts(n_cells=200, n_genes=60, n_de_genes_per_type=10, seed=1)
    data = lvmzoo.setup_anndata(adata, batch_key="batch", kind="counts")
    model = lvmzoo.models.SCVI(n_hidden=16, n_latent=3, n_epochs_kl_warmup=None)
    fitted = lvmzoo.fit(model, data, epochs=3, batch_size=100, learning_rate=1e-2,
                        progress=False)
    lvmzoo.save_model(fitted, out / "model")
    fitted.annotate(adata, data)[0].write_h5ad(out / "result.h5ad")
    return out


def test_de_writes_one_row_per_gene_and_prints_the_top_genes(scvi_run, tmp_path, capsys):
    csv = tmp_path / "tables" / "de.csv"  # the directory is created
    rc = cli.main(["de", str(scvi_run), "--groupby", "cell_type", "--group1", "type0",
                   "--mode", "change", "--n-samples", "200", "--out", str(csv)])
    printed = capsys.readouterr().out
    assert rc == 0
    table = pd.read_csv(csv, index_col="gene")
    assert len(table) == 60 and table.index.is_unique
    assert {"proba_de", "lfc_mean", "bayes_factor", "is_de_fdr_0.05"} <= set(table.columns)
    assert (table["comparison"] == "type0 vs Rest").all()
    assert "type0 vs Rest" in printed and f"wrote {csv}" in printed
    assert table.index[0] in printed  # the top gene is shown
    # The numbers are the Python API's on result.h5ad (the default DATA).
    adata = ad.read_h5ad(scvi_run / "result.h5ad")
    fitted = lvmzoo.load_model(scvi_run / "model")
    expected = lvmzoo.analysis.differential_expression(
        fitted, lvmzoo.query_anndata(adata, fitted.registry), "cell_type", "type0",
        adata=adata, mode="change", n_samples=200)
    np.testing.assert_allclose(table["proba_de"], expected["proba_de"])
    np.testing.assert_allclose(table["lfc_mean"], expected["lfc_mean"], rtol=1e-6)


def test_de_with_explicit_data_model_dir_and_group2(scvi_run, tmp_path, capsys):
    data = tmp_path / "cells.h5ad"
    ad.read_h5ad(scvi_run / "result.h5ad").write_h5ad(data)
    rc = cli.main(["de", str(scvi_run / "model"), str(data), "--groupby", "cell_type",
                   "--group1", "type1", "--group2", "type2", "--n-samples", "200",
                   "--out", str(tmp_path / "de.csv")])
    assert rc == 0, capsys.readouterr().err
    table = pd.read_csv(tmp_path / "de.csv", index_col="gene")
    assert (table["comparison"] == "type1 vs type2").all()
    assert "bayes_factor" in table and "proba_de" not in table  # vanilla by default


DE_ERRORS = {
    "unknown column": (["--groupby", "donor"], "groupby 'donor' is not a column of adata.obs"),
    "unknown group": (["--groupby", "cell_type", "--group1", "type9"],
                      "group 'type9' is not in cell_type; its groups: type0, type1"),
    "unknown reference": (["--groupby", "batch", "--group1", "batch0", "--group2", "b7"],
                          "group 'b7' is not in batch"),
}


@pytest.mark.parametrize("case", list(DE_ERRORS))
def test_de_usage_errors_print_one_line_and_exit_2(case, scvi_run, tmp_path, capsys):
    options, expected = DE_ERRORS[case]
    rc = cli.main(["de", str(scvi_run), *options, "--out", str(tmp_path / "de.csv")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert expected in err
    assert not (tmp_path / "de.csv").exists()


def test_de_needs_a_count_model_and_data(fit_run, scvi_run, tmp_path, capsys):
    rc = cli.main(["de", str(fit_run[0]), "--groupby", "g", "--out", str(tmp_path / "de.csv")])
    err = capsys.readouterr().err
    assert rc == 2 and "model 'ppca'" in err and "has no decoder of counts" in err
    bare = tmp_path / "bare"
    shutil.copytree(scvi_run / "model", bare / "model")  # a run without result.h5ad
    rc = cli.main(["de", str(bare), "--groupby", "cell_type", "--out", str(tmp_path / "d.csv")])
    err = capsys.readouterr().err
    assert rc == 2 and f"no DATA given and {bare / 'result.h5ad'} does not exist" in err
