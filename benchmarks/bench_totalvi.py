"""totalVI: lvmzoo ``TotalVI`` against scvi-tools ``scvi.model.TOTALVI``, side by side.

Both tools fit totalVI to the same training cells (RNA + proteins) with the
same optimiser, epochs and KL warm-up, and the benchmark scores the same
held-out cells with the *same* estimator, computed from each tool's own
densities (not from the tools' summary numbers, which differ in what they
include):

=========================  ==================================================
architecture               scvi-tools' TOTALVI defaults where lvmzoo has
                           them: ``n_latent=20``, ``n_hidden=256``, encoder
                           dropout 0.2, batch norm everywhere, the batch
                           into encoder and decoders (``encode_covariates``),
                           observed RNA library, NB RNA with per-gene
                           dispersion, per-protein dispersion, empirical
                           (two-component) background prior per batch and
                           protein; *changed*: 1 hidden layer in the encoder
                           (scvi-tools' default 2; lvmzoo's ``n_layers`` is
                           one depth for every network) and no decoder
                           dropout (scvi-tools' default 0.2; lvmzoo's
                           decoders have none)
training                   Adam, lr 4e-3 (TOTALVI's default), eps 1e-2, L2
                           weight decay 1e-6 (scvi-tools' TrainingPlan;
                           lvmzoo's full-data gradient divided by n_train
                           first), batch size 256, the same epochs, KL
                           warm-up over the first half of them; scvi-tools
                           without its adversarial batch classifier (on by
                           default when a batch lacks proteins; lvmzoo has
                           none), LR-on-plateau or early stopping
split                      10 % of the cells held out (seed 0); the proteins
                           a batch did not measure (all-zero counts in the
                           batch's training cells) are masked by both tools
=========================  ==================================================

Held-out scores, per cell, in nats (higher is better), all from the same
``K`` draws ``(z_k, log beta_k)`` of each tool's own proposal (lvmzoo: its
guide ``q(z | x, y) q(log beta | x, y)``; scvi-tools: its encoder
``q(z | x, y)`` and its decoder's ``q(log beta | z)``)::

    w_k   = log p(z_k) - log q(z_k)                         # latent
    v_k   = sum_p m_p [log p(log beta_kp) - log q(log beta_kp)]   # background
    rna_k = log p(x | z_k)                                   # NB, all genes
    pro_k = sum_p m_p log p(y_p | z_k, beta_kp)              # NB mixture

    log p(x, y) ~ logmeanexp_k(w_k + v_k + rna_k + pro_k)    # joint (IWAE)
    log p(x)    ~ logmeanexp_k(w_k + rna_k)                  # RNA only
    log p(y)    ~ logmeanexp_k(w_k + v_k + pro_k)            # proteins only
    ELBO        = mean_k(w_k + v_k + rna_k + pro_k)

(``m_p``: the protein was measured in the cell's batch.)  Each is an
importance-sampled lower bound of the same marginal likelihood of the same
counts under the tool's fitted model, so the numbers are comparable between
tools; the RNA and protein bounds integrate the other modality out (its
proposal still reads it).  scvi-tools' protein likelihood includes its
per-batch protein efficiency (1.4.2), as its training loss does.

Also per run: the correlation of the two tools' denoised proteins
(foreground only, ``(1 - pi) alpha beta``, scvi-tools'
``get_normalized_expression(include_protein_background=False,
sample_protein_mixing=False)``; 25 draws each) on the held-out cells, over
the measured (cell, protein) entries, of ``log1p`` values; and each tool's
correlation with the observed protein counts (``log1p``, same entries).

Speed: steady-state seconds per epoch (median of epochs 2..E; lvmzoo's
compilation is outside every epoch and reported apart), ratio scvi-tools /
lvmzoo paired per repeat.  Each run is a fresh worker process, the order
alternating between repeats; ``torch`` uses every core, as XLA does.

Data: the bundled 400 real CITE-seq PBMCs (``lvmzoo.datasets.load_pbmc_citeseq``:
two 10x runs, 2,000 genes, 29 proteins of which the 10k run measured 14) and
a simulated CITE-seq set (``simulate_citeseq`` below: scVI-style RNA from
``lvmzoo.datasets.simulate_counts`` and 30 proteins, each foreground in some
cell types over a per-batch log-normal background).

Usage::

    python benchmarks/bench_totalvi.py          # ~15 min on 2 busy cores; writes
                                                # results/totalvi.{json,md}
    python benchmarks/bench_totalvi.py --quick  # tiny settings; prints, writes nothing
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import hardware, load_average, write_text  # noqa: E402
from bench_scvi import _epoch_summary, _fmt, _peak_rss_mib, _stat, epoch_clock  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULT_PREFIX = "BENCH_TOTALVI_RESULT "
TOOLS = ("lvmzoo", "scvi-tools")
PROTEIN_KEY = "protein_expression"

N_LATENT, N_HIDDEN, N_LAYERS, ENCODER_DROPOUT = 20, 256, 1, 0.2
BATCH_SIZE = 256
LEARNING_RATE = 4e-3  # TOTALVI.train's default
ADAM_EPS = 1e-2
WEIGHT_DECAY = 1e-6
HELDOUT_FRACTION = 0.1
SPLIT_SEED = 0
REAL = "pbmc_citeseq"
SIM_GENES, SIM_PROTEINS, SIM_BATCHES, SIM_TYPES = 2000, 30, 2, 5


@dataclass(frozen=True)
class Settings:
    sizes: tuple[str, ...] = (REAL, "2000")
    epochs: tuple[int, ...] = (60, 20)
    repeats: int = 1
    n_samples: int = 100  # K, both tools
    max_heldout: int = 1000
    worker_timeout: float = 2400.0


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------


def simulate_citeseq(n_cells: int, seed: int = 0):
    """RNA from ``simulate_counts`` and proteins foreground in some cell types.

    Protein ``p`` of a cell of type ``t`` in batch ``b``: background
    ``beta ~ logN(mu_{b,p}, 0.3)`` with ``mu ~ U(log 5, log 40)`` per batch and
    protein; foreground in a random 2 of the 5 types, mean ``beta * f_p`` with
    ``f_p ~ U(4, 20)``; counts NB with inverse dispersion 10.
    """
    import pandas as pd

    from lvmzoo import datasets

    adata = datasets.simulate_counts(n_cells=n_cells, n_genes=SIM_GENES, n_batches=SIM_BATCHES,
                                     n_cell_types=SIM_TYPES, seed=seed)
    rng = np.random.default_rng(seed + 1)
    types = adata.obs["cell_type"].cat.codes.to_numpy()
    batches = adata.obs["batch"].cat.codes.to_numpy()
    on = np.zeros((SIM_TYPES, SIM_PROTEINS), bool)
    for p in range(SIM_PROTEINS):
        on[rng.choice(SIM_TYPES, 2, replace=False), p] = True
    mu = rng.uniform(np.log(5), np.log(40), (SIM_BATCHES, SIM_PROTEINS))
    fold = rng.uniform(4, 20, SIM_PROTEINS)
    background = np.exp(mu[batches] + 0.3 * rng.standard_normal((n_cells, SIM_PROTEINS)))
    mean = background * np.where(on[types], fold, 1.0)
    y = rng.poisson(rng.gamma(10.0, mean / 10.0)).astype(np.float32)
    names = [f"protein{p}" for p in range(SIM_PROTEINS)]
    adata.obs = adata.obs[["batch"]].copy()
    adata.obsm.clear()
    adata.obsm[PROTEIN_KEY] = pd.DataFrame(y, index=adata.obs_names, columns=names)
    adata.uns.clear()
    return adata


def prepare_data(size: str, directory: Path, max_heldout: int) -> tuple[Path, dict[str, Any]]:
    """Write data set ``size`` with ``obs["heldout"]`` and ``obs["evaluate"]`` marks."""
    from lvmzoo import datasets

    if size == REAL:
        adata = datasets.load_pbmc_citeseq()
        description = {"name": REAL, "source": "bundled pbmc_citeseq_400.h5ad (scvi-tools 1.4.2 "
                       "test data: 10x pbmc_10k/5k_protein_v3, 200 cells each)"}
    else:
        adata = simulate_citeseq(int(size), seed=0)
        description = {"name": f"simulated_citeseq_{size}",
                       "source": f"bench_totalvi.simulate_citeseq({size}, seed=0)"}
    order = np.random.default_rng(SPLIT_SEED).permutation(adata.n_obs)
    n_heldout = int(round(HELDOUT_FRACTION * adata.n_obs))
    heldout = np.zeros(adata.n_obs, bool)
    heldout[order[:n_heldout]] = True
    evaluate = np.zeros(adata.n_obs, bool)
    evaluate[order[: min(n_heldout, max_heldout)]] = True
    seen = np.asarray((adata.X[~heldout] > 0).sum(axis=0)).ravel() > 0
    adata = adata[:, seen].copy()
    adata.obs["heldout"] = heldout
    adata.obs["evaluate"] = evaluate
    path = directory / f"{description['name']}.h5ad"
    adata.write_h5ad(path)
    proteins = np.asarray(adata.obsm[PROTEIN_KEY])
    train_batches = adata.obs["batch"][~heldout]
    measured = {str(b): int((proteins[~heldout][(train_batches == b).to_numpy()].sum(0) > 0).sum())
                for b in train_batches.cat.categories}
    description.update({
        "n_cells": int(adata.n_obs), "n_genes": int(adata.n_vars),
        "n_proteins": int(proteins.shape[1]), "proteins_measured_per_batch": measured,
        "n_batches": int(adata.obs["batch"].nunique()),
        "n_train": int((~heldout).sum()), "n_heldout": int(heldout.sum()),
        "n_evaluated": int(evaluate.sum()),
    })
    return path, description


# --------------------------------------------------------------------------
# Workers
# --------------------------------------------------------------------------


def _scores(w, v, rna, pro) -> dict[str, Any]:
    """Per-cell IWAE bounds and ELBO from ``(K, n)`` terms (see the module docstring)."""
    from scipy.special import logsumexp

    def lme(a):
        return logsumexp(a, axis=0) - np.log(a.shape[0])

    joint = lme(w + v + rna + pro)
    return {
        "heldout_ll": float(joint.mean()),
        "heldout_ll_rna": float(lme(w + rna).mean()),
        "heldout_ll_protein": float(lme(w + v + pro).mean()),
        "heldout_elbo": float((w + v + rna + pro).mean()),
        "heldout_reconstruction_rna": float(rna.mean()),
        "heldout_reconstruction_protein": float(pro.mean()),
        "heldout_kl_z": float(-w.mean()),
        "heldout_kl_background": float(-v.mean()),
    }


def run_lvmzoo(train, evaluate, args) -> dict[str, Any]:
    import jax
    import optax

    import lvmzoo
    from lvmzoo.analysis.proteins import protein_outputs
    from lvmzoo.data.source import DeviceSource
    from lvmzoo.infer.evaluate import _traces
    from lvmzoo.models import TotalVI

    started = time.perf_counter()
    model = TotalVI(n_latent=N_LATENT, n_hidden=N_HIDDEN, n_layers=N_LAYERS,
                    dropout_rate=ENCODER_DROPOUT, encode_batch=True, use_batch_norm=True,
                    latent_library=False, dispersion="gene", likelihood="nb",
                    n_epochs_kl_warmup=args.kl_warmup)
    data = lvmzoo.setup_anndata(train, batch_key="batch", **model.registration())
    optimizer = optax.chain(optax.scale(1.0 / data.n_cells),
                            optax.add_decayed_weights(WEIGHT_DECAY),
                            optax.adam(LEARNING_RATE, eps=ADAM_EPS))
    result = lvmzoo.fit(model, data, optimizer=optimizer, epochs=args.epochs,
                        batch_size=BATCH_SIZE, seed=args.seed, validation_fraction=0.0,
                        progress=False)
    train_seconds = time.perf_counter() - started
    history = result.history
    seconds = [float(s) for s in history["seconds"]]
    out = _epoch_summary(seconds, int(history["steps_per_epoch"]) * int(history["batch_size"]))
    compile_seconds = float(history["compile_seconds"])
    out.update({"compile_seconds": compile_seconds,
                "first_epoch_seconds": seconds[0] + compile_seconds,
                "train_seconds": train_seconds, "n_train": int(data.n_cells),
                "peak_rss_train_mib": _peak_rss_mib(), "diverged": bool(result.diverged)})

    heldout = lvmzoo.query_anndata(evaluate, data.registry)
    t0 = time.perf_counter()
    batch = DeviceSource(heldout).full_batch()
    fitted_model, params = result.model, result.params

    def terms(key):
        model_trace, guide_trace = _traces(fitted_model.model, fitted_model.guide, params,
                                           batch, key)

        def lp(trace, name):
            return trace[name]["fn"].log_prob(trace[name]["value"])

        return (lp(model_trace, "z") - lp(guide_trace, "z"),
                lp(model_trace, "log_background") - lp(guide_trace, "log_background"),
                lp(model_trace, "x"), lp(model_trace, "y"))

    keys = jax.random.split(jax.random.PRNGKey(1000 + args.seed), args.n_samples)
    w, v, rna, pro = (np.asarray(t, np.float64) for t in jax.lax.map(jax.jit(terms), keys))
    out.update(_scores(w, v, rna, pro))
    denoised = protein_outputs(result, heldout, n_samples=25, seed=args.seed)["denoised"]
    out["denoised"] = denoised.to_numpy().tolist()
    out["eval_seconds"] = time.perf_counter() - t0
    return out


def run_scvi_tools(train, evaluate, args) -> dict[str, Any]:
    import torch
    from torch.distributions import Normal

    import scvi

    scvi.settings.seed = args.seed
    torch.set_num_threads(os.cpu_count() or 1)
    clock = epoch_clock()
    started = time.perf_counter()
    scvi.model.TOTALVI.setup_anndata(train, batch_key="batch",
                                     protein_expression_obsm_key=PROTEIN_KEY)
    model = scvi.model.TOTALVI(
        train, n_latent=N_LATENT, gene_dispersion="gene", protein_dispersion="protein",
        gene_likelihood="nb", latent_distribution="normal", n_hidden=N_HIDDEN,
        n_layers_encoder=N_LAYERS, n_layers_decoder=N_LAYERS,
        dropout_rate_encoder=ENCODER_DROPOUT, dropout_rate_decoder=0.0,
        encode_covariates=True, use_batch_norm="both", use_layer_norm="none")
    model.train(max_epochs=args.epochs, lr=LEARNING_RATE, accelerator="cpu", devices=1,
                train_size=1.0, batch_size=BATCH_SIZE, early_stopping=False,
                reduce_lr_on_plateau=False, n_epochs_kl_warmup=args.kl_warmup,
                adversarial_classifier=False, enable_progress_bar=False, callbacks=[clock],
                plan_kwargs=dict(eps=ADAM_EPS, weight_decay=WEIGHT_DECAY))
    train_seconds = time.perf_counter() - started
    seconds = clock.seconds()
    out = _epoch_summary(seconds, int(train.n_obs))
    out.update({"train_seconds": train_seconds, "n_train": int(train.n_obs),
                "peak_rss_train_mib": _peak_rss_mib(), "torch_threads": torch.get_num_threads()})

    t0 = time.perf_counter()
    module = model.module
    module.eval()
    mask = module.protein_batch_mask
    evaluate = model._validate_anndata(evaluate)
    loader = model._make_data_loader(adata=evaluate, batch_size=BATCH_SIZE)
    parts = []
    torch.manual_seed(1000 + args.seed)
    with torch.inference_mode():
        for tensors in loader:
            y = tensors["proteins"]
            codes = tensors["batch"].reshape(-1).long()
            if mask is None:
                m = torch.ones_like(y)
            else:
                m = torch.stack([torch.as_tensor(np.asarray(mask[str(int(c))], np.float32))
                                 for c in codes])
            rows = []
            for _ in range(args.n_samples):
                inference, generative, losses = module.forward(tensors)
                z, qz = inference["z"], inference["qz"]
                py = generative["py_"]
                log_back = generative["log_pro_back_mean"]
                prior = inference["back_mean_prior"]
                w = Normal(0.0, 1.0).log_prob(z).sum(-1) - qz.log_prob(z).sum(-1)
                v = ((prior.log_prob(log_back)
                      - Normal(py["back_alpha"], py["back_beta"]).log_prob(log_back)) * m).sum(-1)
                rec = losses.reconstruction_loss
                rows.append(torch.stack([w, v, -rec["reconst_loss_gene"],
                                         -rec["reconst_loss_protein"]]))
            parts.append(torch.stack(rows).double().numpy())  # (K, 4, cells)
    terms = np.concatenate(parts, axis=2)
    out.update(_scores(*(terms[:, i] for i in range(4))))
    _, protein = model.get_normalized_expression(
        evaluate, n_samples=25, include_protein_background=False, sample_protein_mixing=False,
        scale_protein=False, return_mean=True)
    out["denoised"] = np.asarray(protein).tolist()
    out["eval_seconds"] = time.perf_counter() - t0
    return out


def worker_main(args) -> None:
    import anndata as ad

    adata = ad.read_h5ad(args.data)
    train = adata[~adata.obs["heldout"].to_numpy()].copy()
    evaluate = adata[adata.obs["evaluate"].to_numpy()].copy()
    run = run_lvmzoo if args.worker == "lvmzoo" else run_scvi_tools
    out = run(train, evaluate, args)
    out.update({"tool": args.worker, "seed": args.seed, "epochs": args.epochs,
                "kl_warmup": args.kl_warmup, "n_samples": args.n_samples,
                "n_evaluated": int(evaluate.n_obs), "peak_rss_mib": _peak_rss_mib()})
    print(RESULT_PREFIX + json.dumps(out), flush=True)


# --------------------------------------------------------------------------
# Parent
# --------------------------------------------------------------------------


def launch(tool: str, path: Path, epochs: int, kl_warmup: int, seed: int,
           settings: Settings) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", tool,
               "--data", str(path), "--epochs", str(epochs), "--kl-warmup", str(kl_warmup),
               "--n-samples", str(settings.n_samples), "--seed", str(seed)]
    load = load_average()
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                          timeout=settings.worker_timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{tool} worker failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-4000:]}\n{proc.stdout[-2000:]}")
    out = json.loads(lines[-1][len(RESULT_PREFIX):])
    out["process_seconds"] = time.perf_counter() - started
    out["load_average_at_start"] = load
    return out


def correlations(path: Path, runs: dict[str, list[dict[str, Any]]]) -> dict[str, list[float]]:
    """Per repeat: denoised-protein correlations between tools and with the observed counts."""
    import anndata as ad

    adata = ad.read_h5ad(path)
    cells = adata.obs["evaluate"].to_numpy()
    train = ~adata.obs["heldout"].to_numpy()
    y = np.asarray(adata.obsm[PROTEIN_KEY], np.float64)
    batches = adata.obs["batch"].to_numpy()
    measured_in = {b: y[train & (batches == b)].sum(0) > 0 for b in np.unique(batches)}
    entries = np.stack([measured_in[b] for b in batches[cells]])
    observed = np.log1p(y[cells][entries])
    out: dict[str, list[float]] = {"between_tools": [], "lvmzoo_vs_counts": [],
                                   "scvi_tools_vs_counts": [], "between_tools_per_protein": []}
    for zoo, ref in zip(runs["lvmzoo"], runs["scvi-tools"]):
        a, b = np.asarray(zoo.pop("denoised")), np.asarray(ref.pop("denoised"))
        la, lb = np.log1p(a), np.log1p(b)
        out["between_tools"].append(float(np.corrcoef(la[entries], lb[entries])[0, 1]))
        out["lvmzoo_vs_counts"].append(float(np.corrcoef(la[entries], observed)[0, 1]))
        out["scvi_tools_vs_counts"].append(float(np.corrcoef(lb[entries], observed)[0, 1]))
        per = [np.corrcoef(la[entries[:, p], p], lb[entries[:, p], p])[0, 1]
               for p in range(a.shape[1]) if entries[:, p].sum() > 2]
        out["between_tools_per_protein"].append(float(np.nanmedian(per)))
    return out


SCORES = ("heldout_ll", "heldout_ll_rna", "heldout_ll_protein", "heldout_elbo",
          "heldout_reconstruction_rna", "heldout_reconstruction_protein", "heldout_kl_z",
          "heldout_kl_background")


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    keys = ("steady_epoch_seconds", "first_epoch_seconds", "train_seconds",
            "peak_rss_train_mib", "eval_seconds", "compile_seconds") + SCORES
    out = {tool: {k: _stat([r[k] for r in tool_runs]) for k in keys
                  if all(k in r for r in tool_runs)} for tool, tool_runs in runs.items()}
    pairs = list(zip(runs["lvmzoo"], runs["scvi-tools"]))
    paired = {"epoch_time_ratio": [s["steady_epoch_seconds"] / z["steady_epoch_seconds"]
                                   for z, s in pairs]}
    for k in ("heldout_ll", "heldout_ll_rna", "heldout_ll_protein", "heldout_elbo"):
        paired[f"{k}_difference"] = [z[k] - s[k] for z, s in pairs]
        paired[f"{k}_relative_difference"] = [(z[k] - s[k]) / abs(s[k]) for z, s in pairs]
    out["paired"] = {k: {**_stat(v), "values": v} for k, v in paired.items()}
    return out


def machine_info() -> dict[str, Any]:
    versions = {}
    for package in ("lvmzoo", "jax", "jaxlib", "numpyro", "flax", "optax", "torch",
                    "scvi-tools", "lightning", "anndata", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {**hardware(), "versions": versions}


def render_markdown(report: dict[str, Any]) -> str:
    s, m = report["settings"], report["machine"]
    v = m["versions"]
    lines = [
        "# totalVI: lvmzoo vs scvi-tools",
        "",
        f"Same model for both (scvi-tools' TOTALVI defaults: n_latent {N_LATENT}, n_hidden "
        f"{N_HIDDEN}, encoder dropout {ENCODER_DROPOUT}, batch norm, batch into encoder and "
        "decoders, observed library, NB RNA with per-gene dispersion, per-protein dispersion, "
        "empirical background prior per batch and protein; changed for both: 1 hidden layer "
        "in the encoder, no decoder dropout); Adam lr 4e-3, eps 1e-2, weight decay 1e-6, "
        f"batch size {BATCH_SIZE}, KL warm-up over half the epochs; scvi-tools without its "
        "adversarial batch classifier, LR-on-plateau or early stopping. 90 % of the cells "
        "train both tools; proteins a batch did not measure are masked by both. "
        f"Median over {s['repeats']} repeat(s) (range in brackets), each tool in a fresh "
        "process, the order alternating; repeat r uses seed r.",
        "",
        "**Speed.** Epoch s: steady-state (median of epochs 2..E); lvmzoo's XLA compilation is "
        "reported apart (compile s). **Ratio** = scvi-tools epoch s / lvmzoo epoch s, paired "
        "per repeat (target ≥ 3).",
        "",
        "| data | cells (train) × genes × proteins | epochs | tool | epoch s | compile s "
        "| fit s (total) | peak RSS MiB | **ratio** |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    ll = [
        "",
        "**Held-out likelihood**, per cell, nats, higher is better; the same estimator for "
        f"both tools, from each tool's own densities and K = {s['n_samples']} draws of its own "
        "proposal: joint = IWAE bound of log p(x, y) (RNA counts x of all genes, protein counts "
        "y of the proteins measured in the cell's batch); RNA = IWAE bound of log p(x) "
        "(proteins integrated out); protein = IWAE bound of log p(y) (RNA integrated out); "
        "ELBO = its one-sample expectation. Δ = lvmzoo − scvi-tools (nats per cell), paired "
        "per repeat; > 0 favours lvmzoo.",
        "",
        "| data | held-out cells | tool | joint log p(x,y) | RNA log p(x) | protein log p(y) "
        "| ELBO | Δ joint | Δ RNA | Δ protein |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    corr = [
        "",
        "**Denoised proteins** (foreground only, 25 draws, held-out cells, log1p, over the "
        "measured (cell, protein) entries): Pearson r between the two tools (all entries, and "
        "the median over proteins of the per-protein r across cells), and of each tool with "
        "the observed counts.",
        "",
        "| data | r lvmzoo vs scvi-tools | median per-protein r | r lvmzoo vs counts "
        "| r scvi-tools vs counts |",
        "|---|---|---|---|---|",
    ]
    for entry in report["results"]:
        d, st = entry["data"], entry["summary"]
        pair = st["paired"]
        shape = f"{d['n_train']:,} × {d['n_genes']:,} × {d['n_proteins']}"
        for tool in TOOLS:
            t = st[tool]
            ratio = f"**{_fmt(pair['epoch_time_ratio'], '.2f')}**" if tool == "scvi-tools" else ""
            comp = _fmt(t["compile_seconds"], ".1f") if "compile_seconds" in t else ""
            lines.append(f"| {d['name']} | {shape} | {entry['epochs']} | {tool} "
                         f"| {_fmt(t['steady_epoch_seconds'], '.3f')} | {comp} "
                         f"| {_fmt(t['train_seconds'], '.0f')} "
                         f"| {_fmt(t['peak_rss_train_mib'], ',.0f')} | {ratio} |")
            deltas = ["", "", ""]
            if tool == "scvi-tools":
                deltas = [f"**{_fmt(pair[f'{k}_difference'], '+.2f')}**"
                          for k in ("heldout_ll", "heldout_ll_rna", "heldout_ll_protein")]
            ll.append(f"| {d['name']} | {d['n_evaluated']:,} | {tool} "
                      f"| {_fmt(t['heldout_ll'], '.2f')} | {_fmt(t['heldout_ll_rna'], '.2f')} "
                      f"| {_fmt(t['heldout_ll_protein'], '.2f')} "
                      f"| {_fmt(t['heldout_elbo'], '.2f')} | " + " | ".join(deltas) + " |")
        c = {k: _stat(vals) for k, vals in entry["correlations"].items()}
        corr.append(f"| {d['name']} | {_fmt(c['between_tools'], '.3f')} "
                    f"| {_fmt(c['between_tools_per_protein'], '.3f')} "
                    f"| {_fmt(c['lvmzoo_vs_counts'], '.3f')} "
                    f"| {_fmt(c['scvi_tools_vs_counts'], '.3f')} |")
    loads = [r["load_average_at_start"][0] for e in report["results"]
             for tool_runs in e["runs"].values() for r in tool_runs
             if r.get("load_average_at_start")]
    load_text = (f"; 1-min load average {m['load_average_at_start'][0]} at start, "
                 f"{min(loads):.1f}–{max(loads):.1f} at the start of the runs"
                 if loads and m.get("load_average_at_start") else "")
    lines += ll + corr + [
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, {m['os']}; "
        f"Python {m['python']}, jax {v['jax']}, numpyro {v['numpyro']}, flax {v['flax']}, "
        f"optax {v['optax']}, torch {v['torch']}, scvi-tools {v['scvi-tools']}, "
        f"lightning {v['lightning']}; {m['date']}{load_text}. "
        f"Benchmark wall time {report['wall_seconds'] / 60:.1f} min.",
        "",
    ]
    return "\n".join(lines)


def _parse_list(text: str, cast) -> tuple:
    return tuple(cast(t.strip()) for t in text.split(",") if t.strip())


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="pbmc_citeseq and 2,000 simulated cells, few epochs, 1 repeat, "
                             "K=10; prints only (unless --output-dir is given)")
    parser.add_argument("--sizes", default=None,
                        help=f"comma-separated: '{REAL}' and/or numbers of simulated cells "
                             "(default pbmc_citeseq,2000)")
    parser.add_argument("--epochs", default=None, help="one number, or one per size "
                                                       "(default 60,20)")
    parser.add_argument("--repeats", type=int, default=None, help="default 1")
    parser.add_argument("--n-samples", type=int, default=None, help="K (default 100)")
    parser.add_argument("--output-dir", type=Path, default=None)
    parser.add_argument("--worker", choices=TOOLS, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--kl-warmup", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.epochs = int(args.epochs)
        return None, None, args
    sizes = _parse_list(args.sizes, str) if args.sizes else (
        (REAL, "2000") if args.quick else Settings.sizes)
    epochs = _parse_list(args.epochs, int) if args.epochs else (
        (20, 3) if args.quick else Settings.epochs)
    if len(epochs) == 1:
        epochs = epochs * len(sizes)
    if len(epochs) != len(sizes) or min(epochs) < 2:
        parser.error("--epochs: one value >= 2, or one per size")
    settings = Settings(sizes=sizes, epochs=epochs,
                        repeats=args.repeats or (1 if args.quick else Settings.repeats),
                        n_samples=args.n_samples or (10 if args.quick else Settings.n_samples))
    output = args.output_dir or (None if args.quick else RESULTS_DIR)
    return settings, output, args


def main(argv=None) -> Optional[dict[str, Any]]:
    settings, output, args = parse_args(argv)
    if settings is None:
        worker_main(args)
        return None
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.perf_counter()
    machine = machine_info()
    cache = Path(tempfile.mkdtemp(prefix="bench_totalvi_"))
    try:
        results = []
        for size, epochs in zip(settings.sizes, settings.epochs):
            path, info = prepare_data(size, cache, settings.max_heldout)
            warmup = max(1, epochs // 2)
            runs: dict[str, list] = {tool: [] for tool in TOOLS}
            for repeat in range(settings.repeats):
                order = TOOLS if repeat % 2 == 0 else TOOLS[::-1]
                for tool in order:
                    run = launch(tool, path, epochs, warmup, repeat, settings)
                    runs[tool].append(run)
                    print(f"{info['name']:>26s} repeat {repeat} {tool:10s} epoch "
                          f"{run['steady_epoch_seconds']:.3f} s  LL {run['heldout_ll']:.2f} "
                          f"(RNA {run['heldout_ll_rna']:.2f}, protein "
                          f"{run['heldout_ll_protein']:.2f})", flush=True)
            corr = correlations(path, runs)
            results.append({"data": info, "epochs": epochs, "kl_warmup": warmup,
                            "summary": summarise(runs), "correlations": corr, "runs": runs})
            if output is not None:  # after every data set: a slow one later loses nothing
                write_report(output, settings, machine, results, started, final=False)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return write_report(output, settings, machine, results, started, final=True)


def write_report(output, settings, machine, results, started, final: bool) -> dict[str, Any]:
    """The JSON and markdown reports of ``results`` so far (printed when ``final``)."""
    report = {
        "benchmark": "totalvi",
        "settings": {**dataclasses.asdict(settings), "batch_size": BATCH_SIZE,
                     "learning_rate": LEARNING_RATE, "adam_eps": ADAM_EPS,
                     "weight_decay": WEIGHT_DECAY,
                     "architecture": dict(n_latent=N_LATENT, n_hidden=N_HIDDEN,
                                          n_layers=N_LAYERS, encoder_dropout=ENCODER_DROPOUT,
                                          decoder_dropout=0.0),
                     "heldout_fraction": HELDOUT_FRACTION, "split_seed": SPLIT_SEED},
        "machine": {**machine, "load_average_at_end": load_average()},
        "results": results,
        "complete": final,
        "wall_seconds": time.perf_counter() - started,
    }
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        write_text(output / "totalvi.json", json.dumps(report, indent=2) + "\n")
    markdown = render_markdown(report)
    if final:
        print(markdown)
    if output is not None:
        write_text(output / "totalvi.md", markdown)
        if final:
            print(f"wrote {output / 'totalvi.json'} and {output / 'totalvi.md'}")
    return report


if __name__ == "__main__":
    main()
