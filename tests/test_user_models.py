"""A model written outside the package gets what the zoo's own models get.

The model lives in a file in a temporary directory, as a user's would: it is
fitted by ``lvmzoo fit file.py:Class`` and ``lvmzoo fit module:Class``, its
fields become flags, it is compared by ``lvmzoo compare``, saved, loaded and
evaluated by ``lvmzoo evaluate`` in a new process that never imported it, and an
installed package's ``lvmzoo.models`` entry point makes it known by name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import lvmzoo
from lvmzoo import cli, datasets
from lvmzoo.models import registry

USER_MODEL = textwrap.dedent('''
    """A user's model: Poisson factors of raw counts with a linear encoder."""
    import dataclasses
    from typing import ClassVar

    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from numpyro.distributions import constraints

    from lvmzoo.models import LatentModel, cell_plate


    @dataclasses.dataclass(frozen=True)
    class PoissonFactors(LatentModel):
        """Poisson factor model of raw counts, log rate = W z + b + log library.

        Attributes:
          n_latent: number of factors.
          prior_scale: standard deviation of the factors' normal prior.
        """

        n_latent: int = 2
        prior_scale: float = 1.0

        name: ClassVar[str] = "poisson_factors"
        data_kind: ClassVar[str] = "counts"
        default_transform: ClassVar[str] = "none"
        default_learning_rate: ClassVar[float] = 1e-2

        def model(self, batch):
            n_genes, k = batch.x.shape[-1], self.n_latent
            W = numpyro.param("W", 0.01 * jnp.sin(jnp.arange(n_genes * k).reshape(n_genes, k)))
            b = numpyro.param("b", jnp.full(n_genes, -jnp.log(n_genes)))
            log_library = jnp.log(batch.x.sum(-1, keepdims=True) + 1.0)
            with cell_plate(batch):
                z = numpyro.sample("z", dist.Normal(0.0, self.prior_scale).expand([k]).to_event(1))
                rate = jnp.exp(jnp.clip(z @ W.T + b + log_library, -20.0, 20.0))
                numpyro.sample("x", dist.Poisson(rate).to_event(1), obs=batch.x)

        def guide(self, batch):
            n_genes, k = batch.x.shape[-1], self.n_latent
            A = numpyro.param("encoder", jnp.zeros((n_genes, k)))
            scale = numpyro.param("encoder_scale", 0.1 * jnp.ones(k),
                                  constraint=constraints.positive)
            with cell_plate(batch):
                numpyro.sample("z", dist.Normal(jnp.log1p(batch.x) @ A, scale).to_event(1))

        def latent(self, params, batch, key):
            return jnp.log1p(batch.x) @ params["encoder"]
''')


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("user")
    (root / "user_models.py").write_text(USER_MODEL)
    adata = datasets.simulate_counts(n_cells=240, n_genes=25, n_batches=1,
                                      n_de_genes_per_type=2, seed=3)
    adata.write_h5ad(root / "cells.h5ad")
    return root


def _lvmzoo(*args, cwd, env=None):
    """``lvmzoo ARGS`` in a new Python process (nothing of this one carries over)."""
    return subprocess.run([sys.executable, "-m", "lvmzoo.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def fitted_run(user_dir):
    """``lvmzoo fit user_models.py:PoissonFactors`` (in this process), with its own flags."""
    out = user_dir / "run"
    rc = cli.main(["fit", f"{user_dir / 'user_models.py'}:PoissonFactors", str(user_dir / "cells.h5ad"),
                   "--out", str(out), "--epochs", "3", "--n-latent", "3", "--prior-scale", "0.5",
                   "--no-progress", "--plot-method", "pca"])
    assert rc == 0
    return out


def test_a_file_model_fits_from_the_cli_with_its_fields_as_flags(fitted_run):
    description = json.loads((fitted_run / "model" / "model.json").read_text())
    assert description["model"] == "poisson_factors"
    assert description["config"] == {"n_latent": 3, "prior_scale": 0.5}
    assert description["model_class"].endswith("user_models.py:PoissonFactors")
    metrics = json.loads((fitted_run / "metrics.json").read_text())
    assert np.isfinite(metrics["train"]["elbo"])
    assert (fitted_run / "result.h5ad").is_file()


def test_fit_help_of_a_user_model_shows_its_fields_with_their_docstring(user_dir, capsys):
    assert cli.main(["fit", f"{user_dir / 'user_models.py'}:PoissonFactors", "--help"]) == 0
    printed = capsys.readouterr().out
    assert "--prior-scale X" in printed
    assert "standard deviation of the factors' normal prior" in printed
    assert "poisson_factors" in printed


def test_a_saved_user_model_loads_and_evaluates_in_a_new_process(fitted_run, user_dir):
    done = _lvmzoo("evaluate", fitted_run, user_dir / "cells.h5ad", "--out",
                   user_dir / "eval.json", "--n-samples", "5", cwd=user_dir.parent)
    assert done.returncode == 0, done.stderr
    metrics = json.loads((user_dir / "eval.json").read_text())
    assert metrics["n_cells"] == 240 and np.isfinite(metrics["avg_log_likelihood"])
    # The same numbers as this process's Python API.
    fitted = lvmzoo.load_model(fitted_run / "model")
    data = lvmzoo.query_anndata(__import__("anndata").read_h5ad(user_dir / "cells.h5ad"),
                                fitted.registry)
    expected = fitted.evaluate(data, n_samples=5, seed=0)
    assert metrics["avg_log_likelihood"] == pytest.approx(expected["avg_log_likelihood"], rel=1e-5)


def test_a_file_imported_by_name_and_loaded_from_a_run_is_one_class(fitted_run, user_dir):
    """A user who imports their model (``from user_models import PoissonFactors``) and loads a
    run of ``user_models.py:PoissonFactors`` in one process gets their own class back, in
    either order while the file is importable by name (loading imports it under its own name);
    a file put on ``sys.path`` only after the run was loaded is imported twice, and the two
    classes count as one (check_model's save/load check once refused the user's class)."""
    script = textwrap.dedent(f"""
        import sys
        import lvmzoo
        from lvmzoo.models import MODELS
        if sys.argv[1] == "import_first":
            sys.path.insert(0, {str(user_dir)!r})
            from user_models import PoissonFactors
            fitted = lvmzoo.load_model({str(fitted_run)!r})
            assert type(fitted.model) is PoissonFactors, type(fitted.model).__module__
        elif sys.argv[1] == "load_first":
            sys.path.insert(0, {str(user_dir)!r})
            fitted = lvmzoo.load_model({str(fitted_run)!r})
            from user_models import PoissonFactors
            assert type(fitted.model) is PoissonFactors, type(fitted.model).__module__
            assert isinstance(fitted.model, PoissonFactors)
        else:  # the file's directory is put on sys.path only after loading
            fitted = lvmzoo.load_model({str(fitted_run)!r})
            sys.path.insert(0, {str(user_dir)!r})
            from user_models import PoissonFactors
            assert type(fitted.model) is not PoissonFactors  # imported by path first
            lvmzoo.register_model(PoissonFactors)  # the same source: no name clash
            assert MODELS["poisson_factors"] is PoissonFactors
        print("ok")
    """)
    for order in ("import_first", "load_first", "path_added_after_loading"):
        done = subprocess.run([sys.executable, "-c", script, order], capture_output=True,
                              text=True, timeout=600, cwd=user_dir.parent)
        assert done.returncode == 0 and done.stdout.strip() == "ok", (order, done.stderr[-2000:])


def test_a_user_model_fits_as_a_seed_ensemble_and_loads_in_a_new_process(user_dir, tmp_path):
    """``--replicates`` works for a model the library has never seen, and the saved ensemble
    loads as one object in a new process (the model imported from its file again)."""
    out = tmp_path / "ensemble"
    rc = cli.main(["fit", f"{user_dir / 'user_models.py'}:PoissonFactors",
                   str(user_dir / "cells.h5ad"), "--out", str(out), "--epochs", "3",
                   "--replicates", "2", "--no-progress", "--plot-method", "pca",
                   "--score-cells", "all"])
    assert rc == 0
    assert (out / "model" / "ensemble.json").is_file()
    done = _lvmzoo("evaluate", out, user_dir / "cells.h5ad", "--out", tmp_path / "eval.json",
                   "--n-samples", "5", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "eval.json").read_text())
    ensemble = lvmzoo.load_model(out / "model")
    assert ensemble.n_replicates == 2
    assert len(metrics["replicate_avg_log_likelihood"]) == 2
    # The mixture of the replicates is at least their average (Jensen), cell by cell.
    assert metrics["avg_log_likelihood"] >= metrics["single_fit_avg_log_likelihood"]


def test_a_run_whose_model_file_is_gone_says_what_to_make_importable(fitted_run, user_dir,
                                                                     tmp_path):
    moved = tmp_path / "run"
    description = json.loads((fitted_run / "model" / "model.json").read_text())
    description["model_class"] = str(tmp_path / "gone.py") + ":PoissonFactors"
    description["model"] = "poisson_factors_elsewhere"
    moved.mkdir()
    for name in ("registry.json", "params.msgpack", "history.json"):
        (moved / name).write_bytes((fitted_run / "model" / name).read_bytes())
    (moved / "model.json").write_text(json.dumps(description))
    done = _lvmzoo("evaluate", moved, user_dir / "cells.h5ad", "--out", tmp_path / "e.json",
                   cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1, done.stderr
    assert "gone.py" in done.stderr and "does not exist" in done.stderr


def test_a_module_model_fits_by_import_path_from_its_directory(user_dir):
    done = _lvmzoo("fit", "user_models:PoissonFactors", "cells.h5ad", "--out", "run_module",
                   "--epochs", "2", "--no-progress", "--validation-fraction", "0",
                   "--plot-method", "pca", cwd=user_dir)
    assert done.returncode == 0, done.stderr
    description = json.loads((user_dir / "run_module" / "model" / "model.json").read_text())
    assert description["model_class"] == "user_models:PoissonFactors"


def test_compare_runs_a_user_model(user_dir, tmp_path, capsys):
    rc = cli.main(["compare", f"{user_dir / 'user_models.py'}:PoissonFactors",
                   str(user_dir / "cells.h5ad"), "--methods", "amortized,mean_field",
                   "--epochs", "20", "--n-cells", "120", "--n-genes", "10", "--n-samples", "5",
                   "--out", str(tmp_path / "cmp")])
    assert rc == 0, capsys.readouterr().err
    table = (tmp_path / "cmp" / "compare.csv").read_text()
    assert table.count("poisson_factors") == 2


def test_an_installed_entry_point_makes_the_model_known_by_name(user_dir, tmp_path):
    site = tmp_path / "site"
    package = site / "userpkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "models.py").write_text(USER_MODEL)
    info = site / "userpkg-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: userpkg\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text(
        "[lvmzoo.models]\npoisson_factors = userpkg.models:PoissonFactors\n")
    (info / "top_level.txt").write_text("userpkg\n")
    env = {"PYTHONPATH": str(site)}
    listed = _lvmzoo("fit", "--help", cwd=tmp_path, env=env)
    assert listed.returncode == 0 and "poisson_factors" in listed.stdout
    done = _lvmzoo("fit", "poisson_factors", user_dir / "cells.h5ad", "--out", tmp_path / "r",
                   "--epochs", "2", "--no-progress", "--validation-fraction", "0",
                   "--plot-method", "pca", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    description = json.loads((tmp_path / "r" / "model" / "model.json").read_text())
    assert description["model_class"] == "userpkg.models:PoissonFactors"
    assert description["model_package"] == {"name": "userpkg", "version": "0.3"}


def test_register_model_refuses_a_name_clash_and_a_non_model():
    @lvmzoo.register_model(name="test_clash_model")
    class A(lvmzoo.models.PPCA):
        pass

    class B(lvmzoo.models.PPCA):
        pass

    with pytest.raises(ValueError, match="already registered"):
        lvmzoo.register_model(B, name="test_clash_model")
    with pytest.raises(TypeError, match="subclass lvmzoo.models.LatentModel"):
        lvmzoo.register_model(dict)
    registry.MODELS.pop("test_clash_model")


def test_unknown_import_path_is_one_line(tmp_path, capsys):
    rc = cli.main(["fit", "no_such_module_xyz:Model", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert "cannot import module 'no_such_module_xyz'" in err
