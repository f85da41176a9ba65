"""scVI: lvmzoo ``SCVI`` against scvi-tools ``scvi.model.SCVI``, side by side.

Both tools fit the same model to the same training cells with the same
optimiser settings, and score the same held-out cells with the same
importance-sampled (IWAE) estimate of ``log p(x)``:

=========================  ==================================================
architecture               ``n_latent=10``, ``n_hidden=128``, ``n_layers=1``,
                           encoder dropout 0.1, batch norm in every hidden
                           layer of encoder and decoder (scvi-tools' default
                           ``use_batch_norm="both"``), observed library size,
                           per-gene dispersion, batch one-hot into the decoder
likelihood                 ``nb`` (``--likelihood nb,zinb`` adds ZINB)
optimiser                  scvi-tools' defaults: Adam, lr 1e-3, eps 1e-2,
                           L2 weight decay 1e-6 (added to the gradient, as
                           ``torch.optim.Adam`` does); batch size 128
KL warm-up                 ``n_epochs_kl_warmup`` the same for both (default:
                           half the epochs, so the second half trains on the
                           ELBO itself)
split                      10 % of the cells held out (seed 0, the same for
                           every run); scvi-tools trains with
                           ``train_size=1.0`` on the other 90 %, lvmzoo with
                           ``validation_fraction=0``; no early stopping
held-out score             ``FittedModel.evaluate(heldout, n_samples=K)``
                           and ``SCVI.get_marginal_ll(heldout,
                           n_mc_samples=K, return_mean=False)`` averaged
                           over cells (both: per-cell log-likelihood in nats,
                           higher is better)
=========================  ==================================================

lvmzoo's loss is the minibatch estimate of the *full-data* ELBO (``n_train``
times the per-cell mean that scvi-tools minimises), so its gradients are
``n_train`` times larger; the benchmark rescales them by ``1 / n_train``
before weight decay and Adam (``optax.scale``), which makes Adam's ``eps``
and the weight decay act exactly as in scvi-tools.  ``--lvmzoo-adam default``
uses lvmzoo's own default (``optax.adam(1e-3)``, eps 1e-8, no decay) instead.

Every measurement runs in a fresh worker process (``python bench_scvi.py
--worker ...``, which prints one JSON line), so each tool's peak memory is its
own and no run inherits another's caches.  A warm-up pair runs first (this VM
backs memory lazily), then, for each data set, the repeats alternate which
tool goes first.  Per run:

* per-epoch wall time: lvmzoo ``history["seconds"]`` (compilation is
  ``history["compile_seconds"]``, outside every epoch); scvi-tools a
  Lightning callback's epoch-start to epoch-start times (the last epoch ends
  at ``on_train_end``).  The *steady-state* epoch time is the median over
  epochs 2..E; the first epoch is reported on its own (for lvmzoo with the
  compilation added);
* cells/s: cells trained on per epoch (lvmzoo drops the last incomplete
  minibatch, scvi-tools does not) / steady-state epoch time;
* peak RSS of the worker after training (``VmHWM``) and its RSS before
  training (data loaded, libraries imported);
* held-out log-likelihood per cell with ``K`` samples on the same cells
  (at most ``--max-heldout`` of the held-out cells, a fixed random subset).

Ratios, paired per repeat: epoch time scvi-tools / lvmzoo (target >= 3) and
``(LL_lvmzoo - LL_scvi) / |LL_scvi|`` (target >= -0.5 %).  The tool's own
``torch`` runs with ``torch.set_num_threads(os.cpu_count())``; XLA uses every
core by default.  This script installs nothing: it needs the ``bench`` extra
and torch (see ``benchmarks/README.md``).

Usage::

    python benchmarks/bench_scvi.py            # ~20 min on 2 cores; writes results/scvi.{json,md}
    python benchmarks/bench_scvi.py --quick    # tiny sizes, 1 repeat; prints, writes nothing
    python benchmarks/bench_scvi.py --accelerator gpu   # scvi-tools on the GPU; lvmzoo on JAX's
                                                        # default device (benchmarks/gpu/run.sh)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import signal
import statistics
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
# Runnable as a script from anywhere in a checkout without installing the package.
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import hardware, load_average, write_text  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULT_PREFIX = "BENCH_SCVI_RESULT "
TOOLS = ("lvmzoo", "scvi-tools")

# The model both tools fit (scvi-tools' SCVI defaults, spelled out).
ARCHITECTURE = dict(n_latent=10, n_hidden=128, n_layers=1, dropout_rate=0.1)
BATCH_SIZE = 128
# scvi.train.TrainingPlan defaults (scvi-tools 1.4.2): torch.optim.Adam(lr, eps, weight_decay).
LEARNING_RATE = 1e-3
ADAM_EPS = 1e-2
WEIGHT_DECAY = 1e-6
HELDOUT_FRACTION = 0.1
SPLIT_SEED = 0
SIMULATED_GENES = 2000
SIMULATED_BATCHES = 2
REAL = "mouse_10k"
# Lightning accelerator of the scvi-tools runs ("cpu", "gpu", "auto"): set by
# --accelerator, read by every worker (bench_scale.py's too) from the environment.
ACCELERATOR_ENV = "LVMZOO_BENCH_ACCELERATOR"


def scvi_accelerator() -> str:
    return os.environ.get(ACCELERATOR_ENV, "cpu")


@dataclass(frozen=True)
class Settings:
    """What one benchmark run measures; recorded verbatim in the JSON."""

    sizes: tuple[str, ...] = (REAL, "20000", "100000")
    epochs: tuple[int, ...] = (10, 5, 2)
    repeats: int = 3
    likelihoods: tuple[str, ...] = ("nb",)
    kl_warmup: Optional[int] = None  # None: per data set, max(1, epochs // 2)
    n_samples: int = 100  # K of the IWAE estimate, both tools
    max_heldout: int = 1000
    lvmzoo_adam: str = "matched"
    warmup: bool = True
    worker_timeout: float = 1800.0
    # torch.set_num_threads of each scvi-tools variant; the first is the headline.
    torch_threads: tuple[int, ...] = (os.cpu_count() or 1,)

    def warmup_epochs(self, epochs: int) -> int:
        return max(1, epochs // 2) if self.kl_warmup is None else self.kl_warmup


# --------------------------------------------------------------------------
# Data (parent): one file per data set, read by every worker
# --------------------------------------------------------------------------


def prepare_data(size: str, directory: Path, max_heldout: int) -> tuple[Path, dict[str, Any]]:
    """Write data set ``size`` (``"mouse_10k"`` or a number of simulated cells) with its split.

    ``obs["heldout"]`` marks the 10 % held-out cells (seed ``SPLIT_SEED``) and
    ``obs["evaluate"]`` the (at most ``max_heldout``) held-out cells scored.

    Returns:
      ``(path to the .h5ad, description)``.
    """
    from lvmzoo import datasets

    if size == REAL:
        adata = datasets.load_mouse_10k()
        batch_key = None
        description = {"name": REAL, "source": "bundled 10x mouse cells, raw UMI counts"}
    else:
        n_cells = int(size)
        adata = datasets.simulate_counts(n_cells=n_cells, n_genes=SIMULATED_GENES,
                                         n_batches=SIMULATED_BATCHES, seed=0)
        batch_key = "batch"
        description = {"name": f"simulated_{n_cells}",
                       "source": f"lvmzoo.datasets.simulate_counts(n_cells={n_cells}, "
                                 f"n_genes={SIMULATED_GENES}, n_batches={SIMULATED_BATCHES}, "
                                 "seed=0) (NB counts, dispersion 0.2)"}
        # Only what the fits read: counts and the batch.
        adata.obs = adata.obs[["batch"]].copy()
        adata.obsm.clear()
        adata.varm.clear()
        adata.uns.clear()
        adata.var = adata.var.iloc[:, :0].copy()
    order = np.random.default_rng(SPLIT_SEED).permutation(adata.n_obs)
    n_heldout = int(round(HELDOUT_FRACTION * adata.n_obs))
    heldout = np.zeros(adata.n_obs, bool)
    heldout[order[:n_heldout]] = True
    evaluate = np.zeros(adata.n_obs, bool)
    evaluate[order[: min(n_heldout, max_heldout)]] = True
    # Both tools need every gene seen in some training cell (lvmzoo refuses
    # all-zero genes): drop the few that only held-out cells express.
    seen = np.asarray((adata.X[~heldout] > 0).sum(axis=0)).ravel() > 0
    n_genes_dropped = int((~seen).sum())
    adata = adata[:, seen].copy()
    adata.obs["heldout"] = heldout
    adata.obs["evaluate"] = evaluate
    path = directory / f"{description['name']}.h5ad"
    adata.write_h5ad(path)
    nnz = adata.X.nnz if hasattr(adata.X, "nnz") else int(np.count_nonzero(adata.X))
    description.update({
        "n_cells": int(adata.n_obs), "n_genes": int(adata.n_vars),
        "n_batches": 1 if batch_key is None else int(adata.obs[batch_key].nunique()),
        "batch_key": batch_key, "density": nnz / (adata.n_obs * adata.n_vars),
        "n_train": int((~heldout).sum()), "n_heldout": int(heldout.sum()),
        "n_evaluated": int(evaluate.sum()),
        "n_genes_dropped": n_genes_dropped,
        "gene_filter": "genes with a count in at least one training cell",
    })
    return path, description


# --------------------------------------------------------------------------
# Worker: one tool, one fit, one fresh process
# --------------------------------------------------------------------------


def _rss_mib() -> float:
    """Current resident set size of this process in MiB."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB.

    Linux's ``VmHWM`` belongs to the process's own address space.  Not
    ``ru_maxrss``: Linux carries that across ``fork`` + ``exec``, so every
    worker would report the parent's peak (which holds the largest data set).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux


def _epoch_summary(epoch_seconds: list[float], cells_per_epoch: int) -> dict[str, Any]:
    """Steady-state (epochs 2..E, median) and first-epoch times."""
    steady = statistics.median(epoch_seconds[1:]) if len(epoch_seconds) > 1 else float("nan")
    return {
        "epoch_seconds": epoch_seconds,
        "first_epoch_seconds": epoch_seconds[0],
        "steady_epoch_seconds": steady,
        "cells_per_epoch": cells_per_epoch,
        "cells_per_second": cells_per_epoch / steady,
    }


def scvi_tools_adam(n_train: int):
    """scvi-tools' optimiser for lvmzoo's full-data loss: per-cell gradient, L2 decay, Adam.

    ``torch.optim.Adam(weight_decay=w)`` adds ``w * param`` to the gradient
    of the per-cell mean loss before the Adam moments; lvmzoo's loss is
    ``n_train`` times that mean, so its gradient is first divided by
    ``n_train``.
    """
    import optax

    return optax.chain(
        optax.scale(1.0 / n_train),
        optax.add_decayed_weights(WEIGHT_DECAY),
        optax.adam(LEARNING_RATE, eps=ADAM_EPS),
    )


def run_lvmzoo(train, evaluate, batch_key, args) -> dict[str, Any]:
    """Fit lvmzoo ``SCVI`` on ``train`` (AnnData) and score ``evaluate``."""
    import jax

    import lvmzoo
    from lvmzoo.models import SCVI

    fields = {f.name for f in dataclasses.fields(SCVI)}
    missing = {"use_batch_norm", "n_epochs_kl_warmup"} - fields
    if missing:
        raise RuntimeError(f"lvmzoo SCVI lacks {sorted(missing)}: cannot match scvi-tools")
    started = time.perf_counter()
    data = lvmzoo.setup_anndata(train, batch_key=batch_key, kind="counts")
    model = SCVI(**ARCHITECTURE, likelihood=args.likelihood, dispersion="gene",
                 latent_library=False, encode_batch=False, use_batch_norm=True,
                 n_epochs_kl_warmup=args.kl_warmup)
    optimizer = scvi_tools_adam(data.n_cells) if args.lvmzoo_adam == "matched" else None
    result = lvmzoo.fit(model, data, optimizer=optimizer, learning_rate=LEARNING_RATE,
                        epochs=args.epochs, batch_size=BATCH_SIZE, seed=args.seed,
                        validation_fraction=0.0, progress=False)
    train_seconds = time.perf_counter() - started
    peak_train = _peak_rss_mib()
    history = result.history
    seconds = [float(s) for s in history["seconds"]]
    out = _epoch_summary(seconds, int(history["steps_per_epoch"]) * int(history["batch_size"]))
    compile_seconds = float(history["compile_seconds"])
    out.update({
        "compile_seconds": compile_seconds,
        # Time to the end of the first epoch, comparable with scvi-tools' first epoch.
        "first_epoch_seconds": seconds[0] + compile_seconds,
        "first_epoch_seconds_excluding_compile": seconds[0],
        "train_seconds": train_seconds,
        "setup_seconds": train_seconds - compile_seconds - sum(seconds),
        "final_train_loss": float(history["loss"][-1]),
        "n_train": int(data.n_cells),
        "peak_rss_train_mib": peak_train,
        "diverged": result.diverged,
        "device": str(jax.devices()[0]),
    })
    if args.n_samples > 0:
        heldout = lvmzoo.query_anndata(evaluate, data.registry)
        t0 = time.perf_counter()
        scores = result.evaluate(heldout, n_samples=args.n_samples, seed=args.seed)
        out.update({
            "heldout_ll": float(scores["avg_log_likelihood"]),
            "heldout_elbo": float(scores["elbo"]),
            "eval_seconds": time.perf_counter() - t0,
        })
    return out


def epoch_clock():
    """A Lightning callback timing scvi-tools' epochs: ``.seconds()`` after training.

    Wall time from each epoch's start to the next one's (the last: to the end
    of training).  Built on call, so importing this module needs no lightning.
    """
    from lightning.pytorch import Callback

    class EpochClock(Callback):
        def __init__(self):
            self.marks: list[float] = []

        def on_train_epoch_start(self, trainer, pl_module):
            self.marks.append(time.perf_counter())

        def on_train_end(self, trainer, pl_module):
            self.marks.append(time.perf_counter())

        def seconds(self) -> list[float]:
            return [b - a for a, b in zip(self.marks[:-1], self.marks[1:])]

    return EpochClock()


def run_scvi_tools(train, evaluate, batch_key, args) -> dict[str, Any]:
    """Fit scvi-tools ``SCVI`` on ``train`` (AnnData) and score ``evaluate``."""
    import torch
    import scvi

    scvi.settings.seed = args.seed
    torch.set_num_threads(args.torch_threads)
    clock = epoch_clock()
    started = time.perf_counter()
    scvi.model.SCVI.setup_anndata(train, batch_key=batch_key)
    model = scvi.model.SCVI(train, **ARCHITECTURE, dispersion="gene",
                            gene_likelihood=args.likelihood, use_observed_lib_size=True,
                            use_batch_norm="both", use_layer_norm="none",
                            encode_covariates=False)
    model.train(
        max_epochs=args.epochs, accelerator=scvi_accelerator(), devices=1, train_size=1.0,
        batch_size=BATCH_SIZE, early_stopping=False, enable_progress_bar=False,
        callbacks=[clock],
        plan_kwargs=dict(optimizer="Adam", lr=LEARNING_RATE, eps=ADAM_EPS,
                         weight_decay=WEIGHT_DECAY, n_epochs_kl_warmup=args.kl_warmup or None,
                         n_steps_kl_warmup=None, reduce_lr_on_plateau=False),
    )
    train_seconds = time.perf_counter() - started
    peak_train = _peak_rss_mib()
    seconds = clock.seconds()
    out = _epoch_summary(seconds, int(train.n_obs))
    history = model.history
    loss = history.get("train_loss_epoch")
    out.update({
        "train_seconds": train_seconds,
        "setup_seconds": train_seconds - sum(seconds),
        "final_train_loss": float(loss.iloc[-1, 0]) if loss is not None else float("nan"),
        "n_train": int(train.n_obs),
        "peak_rss_train_mib": peak_train,
        "torch_threads": torch.get_num_threads(),
        "device": str(model.device),
    })
    if args.n_samples > 0:
        t0 = time.perf_counter()
        per_cell = model.get_marginal_ll(
            evaluate, n_mc_samples=args.n_samples, batch_size=256, return_mean=False,
            n_mc_samples_per_pass=min(args.n_samples, 25))
        # A log-likelihood (higher is better), one per cell: average over cells
        # (return_mean=True would average the minibatch means instead).
        out.update({
            "heldout_ll": float(per_cell.double().mean()),
            "eval_seconds": time.perf_counter() - t0,
        })
    return out


def worker_main(args) -> None:
    """Read the prepared data, run one tool, print one JSON line."""
    import anndata as ad

    adata = ad.read_h5ad(args.data)
    batch_key = "batch" if "batch" in adata.obs else None
    train = adata[~adata.obs["heldout"].to_numpy()].copy()
    evaluate = adata[adata.obs["evaluate"].to_numpy()].copy()
    del adata
    rss_before = _rss_mib()
    run = run_lvmzoo if args.worker == "lvmzoo" else run_scvi_tools
    out = run(train, evaluate, batch_key, args)
    out.update({
        "tool": args.worker, "seed": args.seed, "epochs": args.epochs,
        "likelihood": args.likelihood, "kl_warmup": args.kl_warmup,
        "n_samples": args.n_samples, "n_evaluated": int(evaluate.n_obs),
        "rss_before_train_mib": rss_before, "peak_rss_mib": _peak_rss_mib(),
    })
    print(RESULT_PREFIX + json.dumps(out), flush=True)


# --------------------------------------------------------------------------
# Parent: schedule workers, summarise, report
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One configuration measured per repeat: a tool and, for scvi-tools, its torch threads."""

    label: str
    tool: str
    torch_threads: int = 0  # unused by lvmzoo


def variants(settings: Settings) -> list[Variant]:
    """lvmzoo, then scvi-tools with each ``--torch-threads`` value (the first is the headline)."""
    out = [Variant("lvmzoo", "lvmzoo")]
    for i, threads in enumerate(settings.torch_threads):
        label = "scvi-tools" if i == 0 else f"scvi-tools, {threads} torch thread(s)"
        out.append(Variant(label, "scvi-tools", threads))
    return out


def launch(variant: Variant, path: Path, epochs: int, likelihood: str, kl_warmup: int,
           n_samples: int, seed: int, settings: Settings) -> dict[str, Any]:
    """Run one worker process; its JSON result plus the load average when it started."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", variant.tool,
               "--data", str(path), "--epochs", str(epochs), "--likelihood", likelihood,
               "--kl-warmup", str(kl_warmup), "--n-samples", str(n_samples),
               "--seed", str(seed), "--lvmzoo-adam", settings.lvmzoo_adam,
               "--torch-threads", str(variant.torch_threads or os.cpu_count() or 1)]
    load = load_average()
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                          timeout=settings.worker_timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{variant.label} worker failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-4000:]}\n{proc.stdout[-2000:]}")
    out = json.loads(lines[-1][len(RESULT_PREFIX):])
    out["variant"] = variant.label
    out["process_seconds"] = time.perf_counter() - started
    out["load_average_at_start"] = load
    return out


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Median and range per variant of each measurement, and of its ratios to lvmzoo.

    Ratios are paired by repeat (same seed, run back to back); ``> 1`` (or
    ``> 0`` for the log-likelihood difference) favours lvmzoo.
    """
    keys = ["steady_epoch_seconds", "first_epoch_seconds", "cells_per_second",
            "train_seconds", "peak_rss_train_mib", "rss_before_train_mib", "peak_rss_mib",
            "heldout_ll", "eval_seconds", "compile_seconds", "final_train_loss"]
    out: dict[str, Any] = {}
    for label, label_runs in runs.items():
        out[label] = {k: _stat([r[k] for r in label_runs]) for k in keys
                      if all(k in r for r in label_runs)}
        if label == "lvmzoo":
            continue
        pairs = list(zip(runs["lvmzoo"], label_runs))
        paired = {
            "epoch_time_ratio": [s["steady_epoch_seconds"] / z["steady_epoch_seconds"]
                                 for z, s in pairs],
            "throughput_ratio": [z["cells_per_second"] / s["cells_per_second"]
                                 for z, s in pairs],
            "first_epoch_ratio": [s["first_epoch_seconds"] / z["first_epoch_seconds"]
                                  for z, s in pairs],
            "peak_rss_train_ratio": [s["peak_rss_train_mib"] / z["peak_rss_train_mib"]
                                     for z, s in pairs],
        }
        if all("heldout_ll" in r for pair in pairs for r in pair):
            # Relative to |scvi-tools|.
            paired["relative_ll_difference"] = [
                (z["heldout_ll"] - s["heldout_ll"]) / abs(s["heldout_ll"]) for z, s in pairs]
        out[label]["vs_lvmzoo"] = {k: {**_stat(v), "values": v} for k, v in paired.items()}
    return out


def _stat(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def machine_info() -> dict[str, Any]:
    """The machine (see ``_machine.hardware``) plus the versions of both stacks."""
    versions = {}
    for package in ("lvmzoo", "jax", "jaxlib", "numpyro", "flax", "optax", "torch",
                    "scvi-tools", "lightning", "anndata", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {**hardware(), "gpu": gpu_name(), "versions": versions}


def gpu_name() -> Optional[str]:
    """``nvidia-smi``'s name and memory of each GPU, or None (asks no framework: no GPU memory taken)."""
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                               "--format=csv,noheader"], capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return "; ".join(done.stdout.strip().splitlines()) or None


def _fmt(stat: dict[str, float], fmt: str) -> str:
    """``median (min–max)``, or the single value."""
    if stat["min"] == stat["max"]:
        return format(stat["median"], fmt)
    return f"{stat['median']:{fmt}} ({stat['min']:{fmt}}–{stat['max']:{fmt}})"


def render_markdown(report: dict[str, Any]) -> str:
    """Two tables (speed and memory; held-out log-likelihood) and the machine line."""
    s, m = report["settings"], report["machine"]
    v = m["versions"]
    adam = ("scvi-tools' Adam for both (lr 1e-3, eps 1e-2, L2 weight decay 1e-6; lvmzoo's "
            "full-data gradient divided by n_train first)" if s["lvmzoo_adam"] == "matched"
            else "scvi-tools: Adam(lr 1e-3, eps 1e-2, weight decay 1e-6); lvmzoo: "
                 "optax.adam(1e-3) (its default, eps 1e-8, no decay)")
    threads = ", ".join(str(t) for t in s["torch_threads"])
    lines = [
        "# scVI: lvmzoo vs scvi-tools",
        "",
        "Same model for both: n_latent 10, n_hidden 128, 1 hidden layer, encoder dropout 0.1, "
        "batch norm in encoder and decoder, observed library, per-gene dispersion, batch "
        f"one-hot into the decoder; batch size {BATCH_SIZE}; {adam}; the same KL warm-up "
        "(`warm-up` column: `n_epochs_kl_warmup`); 90 % of the cells train both tools, "
        "scored on the same held-out cells.",
        f"Median over {s['repeats']} repeat(s), each run in its own fresh process, the order "
        "alternating (range in brackets); repeat r uses seed r. Epoch s: steady-state epoch "
        "(median of epochs 2..E); first epoch: lvmzoo's includes its XLA compilation. "
        "**Ratio** = scvi-tools epoch s / lvmzoo epoch s, paired per repeat (> 1: lvmzoo "
        "faster; target ≥ 3). Fit s: the whole training call (lvmzoo: `setup_anndata` + "
        "`fit`, compilation included; scvi-tools: `setup_anndata` + `SCVI()` + `train`). "
        "Peak RSS: the worker process after training (libraries and data included). "
        f"XLA uses all cores; torch {threads} thread(s).",
        "",
        "| data | cells (train) × genes | lik. | epochs | warm-up | tool | epoch s | cells/s "
        "| first epoch s | fit s (total) | peak RSS MiB | **ratio** |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ll_lines = [
        "",
        "Held-out log-likelihood per cell (nats, IWAE with the same K for both; scvi-tools "
        "`get_marginal_ll(return_mean=False)` averaged over cells, lvmzoo "
        "`evaluate()[\"avg_log_likelihood\"]`). **Difference** = (lvmzoo − scvi-tools) / "
        "|scvi-tools|, paired per repeat; target ≥ −0.5 %.",
        "",
        "| data | lik. | held-out cells | K | tool | LL | **difference** |",
        "|---|---|---|---|---|---|---|",
    ]
    for entry in report["results"]:
        d, st = entry["data"], entry["summary"]
        head = (f"| {d['name']} | {d['n_train']:,} × {d['n_genes']:,} | {entry['likelihood']} "
                f"| {entry['epochs']} | {entry['kl_warmup']} ")
        ll_head = f"| {d['name']} | {entry['likelihood']} | {d['n_evaluated']:,} | {s['n_samples']} "
        for label, t in st.items():
            pair = t.get("vs_lvmzoo", {})
            ratio = f"**{_fmt(pair['epoch_time_ratio'], '.2f')}**" if pair else ""
            lines.append(
                f"{head}| {label} | {_fmt(t['steady_epoch_seconds'], '.2f')} "
                f"| {_fmt(t['cells_per_second'], ',.0f')} | {_fmt(t['first_epoch_seconds'], '.1f')} "
                f"| {_fmt(t['train_seconds'], '.0f')} | {_fmt(t['peak_rss_train_mib'], ',.0f')} "
                f"| {ratio} |")
            if "heldout_ll" in t:
                diff = ""
                if "relative_ll_difference" in pair:
                    rel = {k: 100 * pair["relative_ll_difference"][k]
                           for k in ("median", "min", "max")}
                    diff = f"**{_fmt(rel, '+.2f')} %**"
                ll_lines.append(f"{ll_head}| {label} | {_fmt(t['heldout_ll'], '.2f')} | {diff} |")
    loads = [r["load_average_at_start"][0] for e in report["results"]
             for label_runs in e["runs"].values() for r in label_runs
             if r.get("load_average_at_start")]
    load_text = (f"; 1-min load average {m['load_average_at_start'][0]} at start, "
                 f"{min(loads):.1f}–{max(loads):.1f} at the start of the runs"
                 if loads and m.get("load_average_at_start") else "")
    lines += ll_lines + [
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, {m['os']}; "
        + (f"GPU {m['gpu']} (scvi-tools accelerator {s.get('scvi_tools_accelerator', 'cpu')}); "
           if m.get("gpu") else "")
        + f"Python {m['python']}, jax {v['jax']}, numpyro {v['numpyro']}, flax {v['flax']}, "
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
                        help="tiny sizes (2,000 simulated cells and mouse_10k), 2 epochs, "
                             "1 repeat, K=20; prints only (unless --output-dir is given)")
    parser.add_argument("--sizes", default=None,
                        help=f"comma-separated data sets: '{REAL}' and/or numbers of simulated "
                             "cells (default mouse_10k,20000,100000)")
    parser.add_argument("--epochs", default=None,
                        help="one number, or one per size (default 10,5,2)")
    parser.add_argument("--repeats", type=int, default=None, help="fresh-process repeats (default 3)")
    parser.add_argument("--likelihood", default="nb", help="nb, zinb or nb,zinb (default nb)")
    parser.add_argument("--kl-warmup", type=int, default=None,
                        help="n_epochs_kl_warmup for both tools (default: half the epochs; "
                             "0: none; 400: scvi-tools' default)")
    parser.add_argument("--n-samples", type=int, default=None,
                        help="K, importance samples per held-out cell (default 100; 0 skips)")
    parser.add_argument("--max-heldout", type=int, default=Settings.max_heldout,
                        help="score at most this many held-out cells (a fixed random subset)")
    parser.add_argument("--lvmzoo-adam", choices=("matched", "default"), default="matched",
                        help="lvmzoo's optimiser: scvi-tools' Adam settings (default) or "
                             "lvmzoo's optax.adam(1e-3)")
    parser.add_argument("--torch-threads", default=None,
                        help="torch.set_num_threads for scvi-tools (default: all cores); "
                             "a list such as 2,1 adds a scvi-tools run per extra value")
    parser.add_argument("--no-warmup", action="store_true", help="skip the warm-up pair")
    parser.add_argument("--accelerator", choices=("cpu", "gpu", "auto"), default=None,
                        help=f"Lightning accelerator of scvi-tools (default: ${ACCELERATOR_ENV} "
                             "or cpu); lvmzoo runs on JAX's default device (JAX_PLATFORMS)")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help=f"where to write scvi.json/.md (default {RESULTS_DIR})")
    # Internal: one worker run.
    parser.add_argument("--worker", choices=TOOLS, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.accelerator:
        os.environ[ACCELERATOR_ENV] = args.accelerator  # the workers inherit it
    if args.worker:
        args.epochs = int(args.epochs)
        args.torch_threads = int(args.torch_threads or os.cpu_count() or 1)
        return None, None, args
    quick = args.quick
    sizes = _parse_list(args.sizes, str) if args.sizes else (
        (REAL, "2000") if quick else Settings.sizes)
    epochs = _parse_list(args.epochs, int) if args.epochs else (
        (2,) if quick else Settings.epochs)
    if len(epochs) == 1:
        epochs = epochs * len(sizes)
    if len(epochs) != len(sizes):
        parser.error(f"--epochs needs one value or one per size ({len(sizes)})")
    if min(epochs) < 2:
        parser.error("every data set needs >= 2 epochs (the first one is reported apart)")
    for size in sizes:
        if size != REAL and not size.isdigit():
            parser.error(f"unknown size {size!r}: use {REAL!r} or a number of cells")
    settings = Settings(
        sizes=sizes, epochs=epochs,
        repeats=args.repeats or (1 if quick else Settings.repeats),
        likelihoods=_parse_list(args.likelihood, str),
        kl_warmup=args.kl_warmup,
        n_samples=args.n_samples if args.n_samples is not None else (20 if quick else 100),
        max_heldout=args.max_heldout,
        lvmzoo_adam=args.lvmzoo_adam,
        warmup=not args.no_warmup,
        torch_threads=(_parse_list(args.torch_threads, int) if args.torch_threads
                       else Settings.torch_threads),
    )
    output = args.output_dir or (None if quick else RESULTS_DIR)
    return settings, output, args


def _progress(size, likelihood, repeat, run):
    ll = f" LL {run['heldout_ll']:.2f}" if "heldout_ll" in run else ""
    print(f"{size:>14s} {likelihood:4s} repeat {repeat} {run['variant']:32s} "
          f"epoch {run['steady_epoch_seconds']:7.2f} s (first {run['first_epoch_seconds']:6.1f} s) "
          f"{run['cells_per_second']:8,.0f} cells/s peak {run['peak_rss_train_mib']:6,.0f} MiB"
          f"{ll} [load {run['load_average_at_start'][0] if run['load_average_at_start'] else '?'}]",
          flush=True)


def main(argv=None) -> Optional[dict[str, Any]]:
    settings, output, args = parse_args(argv)
    if settings is None:
        worker_main(args)
        return None
    # A plain `kill` then still runs the clean-up below (the cached data sets).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.perf_counter()
    machine = machine_info()
    print(f"load average at start: {machine['load_average_at_start']}", flush=True)
    cache = Path(tempfile.mkdtemp(prefix="bench_scvi_"))
    try:
        prepared = [prepare_data(size, cache, settings.max_heldout) for size in settings.sizes]
        print(f"data ready in {time.perf_counter() - started:.0f} s", flush=True)
        warmup_runs = []
        if settings.warmup:
            # Fault in libraries and memory once, on the smallest data set; discarded.
            smallest = min(prepared, key=lambda p: p[1]["n_cells"])[0]
            for variant in variants(settings)[:2]:
                warmup_runs.append(launch(variant, smallest, 2, settings.likelihoods[0], 1, 0,
                                          0, settings))
            print(f"warm-up done at {time.perf_counter() - started:.0f} s", flush=True)
        results = []
        for (path, info), epochs in zip(prepared, settings.epochs):
            warmup = settings.warmup_epochs(epochs)
            for likelihood in settings.likelihoods:
                runs = {variant.label: [] for variant in variants(settings)}
                for repeat in range(settings.repeats):
                    # Alternate which tool goes first, so drift in load hits both alike.
                    order = variants(settings)
                    order = order if repeat % 2 == 0 else order[::-1]
                    for variant in order:
                        run = launch(variant, path, epochs, likelihood, warmup,
                                     settings.n_samples, repeat, settings)
                        runs[variant.label].append(run)
                        _progress(info["name"], likelihood, repeat, run)
                results.append({"data": info, "likelihood": likelihood, "epochs": epochs,
                                "kl_warmup": warmup, "summary": summarise(runs), "runs": runs})
    finally:
        shutil.rmtree(cache, ignore_errors=True)

    report = {
        "benchmark": "scvi",
        "settings": {**dataclasses.asdict(settings), "scvi_tools_accelerator": scvi_accelerator(),
                     "batch_size": BATCH_SIZE,
                     "learning_rate": LEARNING_RATE, "adam_eps": ADAM_EPS,
                     "weight_decay": WEIGHT_DECAY, "architecture": ARCHITECTURE,
                     "heldout_fraction": HELDOUT_FRACTION, "split_seed": SPLIT_SEED},
        "machine": {**machine, "load_average_at_end": load_average()},
        "warmup_runs": warmup_runs,
        "results": results,
        "wall_seconds": time.perf_counter() - started,
    }
    if output is not None:  # the JSON first: it holds every measurement
        output.mkdir(parents=True, exist_ok=True)
        write_text(output / "scvi.json", json.dumps(report, indent=2) + "\n")
    markdown = render_markdown(report)
    print(markdown)
    if output is not None:
        write_text(output / "scvi.md", markdown)
        print(f"wrote {output / 'scvi.json'} and {output / 'scvi.md'}")
    return report


if __name__ == "__main__":
    main()
