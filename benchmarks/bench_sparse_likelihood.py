"""Sparse NB / ZINB log-pmf: scVI epoch time with the log binomial coefficient on nonzeros only.

A count matrix is mostly zeros, and the NB log-pmf's expensive part, the log
binomial coefficient ``log Gamma(x + theta) - log Gamma(theta) - log
Gamma(x + 1)`` and its derivative ``psi(x + theta) - psi(theta)``, is exactly
``0`` at ``x = 0``.  ``lvmzoo.models.likelihoods`` can compact each
minibatch's nonzero counts into a buffer of static size (a quarter of the
counts; a minibatch with more nonzeros takes the dense form), evaluate the
coefficient there only and scatter it back (``sparse=True``, default set by
``likelihoods.SPARSE_LOG_PMF``); the zero counts keep only the cheap
``theta log(theta / (theta + mu))`` term.  This benchmark measures whether
that pays for its compaction in a whole scVI epoch.

All in one process and one run, per data set (``simulate_counts`` with
``--genes`` genes, zero fraction reported) and likelihood, four epoch
programs are compiled, then run one epoch each in turn for ``--rounds``
rounds (the order rotating every round, after one warm-up round), each from
its own state:

=================  ============================================================
``lvmzoo old``     the epoch program ``lvmzoo.fit`` compiles for ``SCVI(...)``
                   (``epoch_function`` over a ``DeviceSource``: CSR data on the
                   device, densified per minibatch), dense log-pmf
``lvmzoo new``     the same program with the sparse log-pmf
``floor old``      bare JAX: the same network (encoder and decoder MLPs, one
                   hidden layer of 128, n_latent 10) with no NumPyro / Flax,
                   dense data on the device, no batch norm or dropout, Adam;
                   one ``lax.scan`` per epoch, the dense log-pmf
``floor new``      the same program with the sparse log-pmf
=================  ============================================================

The model is ``bench_scvi``'s (n_latent 10, n_hidden 128, 1 layer, dropout
0.1, batch norm, gene dispersion, observed library, batch one-hot into the
decoder, batch size 128, scvi-tools' Adam settings).  Interleaving single
epochs (rather than whole fits) pairs each new epoch with an old one run
seconds apart, which is what makes ratios usable on a shared machine.  Two
clocks per epoch call: wall time and the process's CPU time over all its
threads (the work a program needs; on an oversubscribed machine it moves
much less with the other processes' load).  Reported: the median epoch over
the rounds (range), and ratios paired per round, median (range):

* **new / old**: lvmzoo new epoch / lvmzoo old epoch (< 1: the sparse path
  is faster);
* **vs floor**: lvmzoo epoch / floor epoch with the same log-pmf, and lvmzoo
  new / floor old (the floor as it stood).

lvmzoo old and new start from the same state and see the same minibatches;
their epoch losses are compared (the two log-pmfs give the same values).

Usage::

    # ~13 min on 2 shared cores; writes results/sparse_likelihood.{json,md}
    python benchmarks/bench_sparse_likelihood.py
    python benchmarks/bench_sparse_likelihood.py --quick  # tiny; prints, writes nothing
    python benchmarks/bench_sparse_likelihood.py --render results/sparse_likelihood.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import hardware, load_average, write_text  # noqa: E402
from bench_scvi import ARCHITECTURE, BATCH_SIZE, LEARNING_RATE, scvi_tools_adam  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
VARIANTS = ("lvmzoo old", "lvmzoo new", "floor old", "floor new")
N_BATCHES = 2
MEAN_LIBRARY = 1000.0


def simulate(n_cells: int, n_genes: int):
    """Simulated NB counts (sparse CSR), all-zero genes dropped; and a description."""
    from lvmzoo import datasets

    adata = datasets.simulate_counts(n_cells=n_cells, n_genes=n_genes, n_batches=N_BATCHES,
                                     mean_library=MEAN_LIBRARY, seed=0)
    adata.obs = adata.obs[["batch"]].copy()
    adata.obsm.clear()
    adata.varm.clear()
    adata.uns.clear()
    adata.var = adata.var.iloc[:, :0].copy()
    seen = np.asarray((adata.X > 0).sum(axis=0)).ravel() > 0
    adata = adata[:, seen].copy()
    density = adata.X.nnz / (adata.n_obs * adata.n_vars)
    rows = np.diff(adata.X.indptr)
    return adata, {
        "n_cells": int(adata.n_obs), "n_genes": int(adata.n_vars),
        "n_genes_requested": n_genes, "n_genes_dropped": int((~seen).sum()),
        "zero_fraction": 1.0 - density,
        "nonzeros_per_cell_median": float(np.median(rows)),
        "source": f"lvmzoo.datasets.simulate_counts(n_cells={n_cells}, n_genes={n_genes}, "
                  f"n_batches={N_BATCHES}, mean_library={MEAN_LIBRARY:g}, seed=0)",
    }


def lvmzoo_program(adata, likelihood: str, epochs: int, sparse: bool, seed: int):
    """lvmzoo's own training epoch for scVI, compiled once: ``(start, run)``.

    The program ``lvmzoo.fit`` compiles (``epoch_function(svi, source,
    guard=False)`` over a :class:`DeviceSource`, the sparse matrix kept as
    CSR on the device and densified per minibatch), built here so that the
    variants' epochs can be interleaved one by one.
    """
    import jax
    import jax.numpy as jnp
    from numpyro.infer import SVI

    import lvmzoo
    from lvmzoo.data.source import DeviceSource, n_steps_per_epoch
    from lvmzoo.infer.svi import epoch_function, epoch_order, initial_state
    from lvmzoo.models import SCVI
    from lvmzoo.models import likelihoods

    data = lvmzoo.setup_anndata(adata, batch_key="batch", kind="counts")
    model = SCVI(**ARCHITECTURE, likelihood=likelihood, dispersion="gene",
                 latent_library=False, encode_batch=False, use_batch_norm=True,
                 n_epochs_kl_warmup=max(1, epochs // 2)).for_data(data)
    svi = SVI(model.model, model.guide, scvi_tools_adam(data.n_cells), loss=model.elbo())
    source = DeviceSource(data)
    key_init, key_order = jax.random.split(jax.random.PRNGKey(seed))
    state = initial_state(svi, model, source, BATCH_SIZE, key_init)
    n_steps = n_steps_per_epoch(source.n_cells, BATCH_SIZE)
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    order_spec = jax.ShapeDtypeStruct((n_steps, BATCH_SIZE), jnp.int32)
    previous = likelihoods.SPARSE_LOG_PMF
    likelihoods.SPARSE_LOG_PMF = sparse  # read while the program is traced
    try:
        program = jax.jit(epoch_function(svi, source, guard=False)).lower(
            state, order_spec, source.arrays, scalar, scalar).compile()
    finally:
        likelihoods.SPARSE_LOG_PMF = previous

    def run(state, epoch):
        order = epoch_order(key_order, epoch, source.n_cells, n_steps, BATCH_SIZE)
        state, losses = program(state, order, source.arrays, jnp.float32(epoch),
                                jnp.float32(epochs))
        return state, float(jnp.mean(losses)) / source.n_cells

    return state, run, n_steps


def floor_program(n_genes: int, likelihood: str, sparse: bool):
    """The bare-JAX scVI step as one compiled epoch: ``(state, x, codes, order, key) -> state, loss``."""
    import jax
    import jax.numpy as jnp
    import optax

    from lvmzoo.models.likelihoods import (negative_binomial_log_prob,
                                           zero_inflated_negative_binomial_log_prob)

    hidden, latent = ARCHITECTURE["n_hidden"], ARCHITECTURE["n_latent"]

    def dense(key, n_in, n_out):
        bound = 1.0 / np.sqrt(n_in)
        k1, k2 = jax.random.split(key)
        return {"w": jax.random.uniform(k1, (n_in, n_out), minval=-bound, maxval=bound),
                "b": jax.random.uniform(k2, (n_out,), minval=-bound, maxval=bound)}

    def init(key):
        keys = jax.random.split(key, 5)
        params = {
            "enc1": dense(keys[0], n_genes, hidden), "enc2": dense(keys[1], hidden, 2 * latent),
            "dec1": dense(keys[2], latent + N_BATCHES, hidden),
            "dec2": dense(keys[3], hidden, n_genes),
            "log_theta": jnp.zeros(n_genes),
        }
        if likelihood == "zinb":
            params["drop"] = dense(keys[4], hidden, n_genes)
        return params

    def layer(p, h):
        return h @ p["w"] + p["b"]

    def loss_fn(params, x, codes, key):
        h = jax.nn.relu(layer(params["enc1"], jnp.log1p(x)))
        loc, raw = jnp.split(layer(params["enc2"], h), 2, axis=-1)
        scale = jax.nn.softplus(raw) + 1e-4
        z = loc + scale * jax.random.normal(key, loc.shape)
        kl = jnp.sum(0.5 * (loc**2 + scale**2 - 1.0) - jnp.log(scale), axis=-1)
        hd = jax.nn.relu(layer(params["dec1"],
                               jnp.concatenate([z, jax.nn.one_hot(codes, N_BATCHES)], -1)))
        log_mean = jnp.log(x.sum(-1, keepdims=True)) + jax.nn.log_softmax(
            layer(params["dec2"], hd))
        theta = jnp.exp(params["log_theta"])
        if likelihood == "zinb":
            log_px = zero_inflated_negative_binomial_log_prob(
                x, log_mean, theta, layer(params["drop"], hd), sparse=sparse)
        else:
            log_px = negative_binomial_log_prob(x, log_mean, theta, sparse=sparse)
        return jnp.mean(kl - log_px.sum(-1))

    optimizer = optax.adam(LEARNING_RATE, eps=1e-2)

    @jax.jit
    def epoch(state, x, codes, order, key):
        def step(carry, inputs):
            params, opt_state = carry
            cells, k = inputs
            loss, grads = jax.value_and_grad(loss_fn)(params, x[cells], codes[cells], k)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        keys = jax.random.split(key, order.shape[0])
        state, losses = jax.lax.scan(step, state, (order, keys))
        return state, losses.mean()

    def start(key):
        params = init(key)
        return params, optimizer.init(params)

    return start, epoch


def floor_runner(adata, likelihood: str, epochs: int, sparse: bool, seed: int):
    """The bare-JAX epoch, compiled once: ``(state, run, n_steps)`` as :func:`lvmzoo_program`."""
    import jax
    import jax.numpy as jnp

    x = jnp.asarray(adata.X.toarray(), jnp.float32)
    codes = jnp.asarray(adata.obs["batch"].cat.codes.to_numpy(), jnp.int32)
    n_steps = -(-adata.n_obs // BATCH_SIZE)
    start, epoch_fn = floor_program(adata.n_vars, likelihood, sparse)
    key = jax.random.PRNGKey(seed)
    state = start(key)
    order_spec = jax.ShapeDtypeStruct((n_steps, BATCH_SIZE), jnp.int32)
    program = epoch_fn.lower(state, x, codes, order_spec, key).compile()

    def run(state, epoch):
        order = jax.random.permutation(jax.random.fold_in(key, epoch), n_steps * BATCH_SIZE)
        order = (order % adata.n_obs).reshape(n_steps, BATCH_SIZE).astype(jnp.int32)
        state, loss = program(state, x, codes, order, jax.random.fold_in(key, 10**6 + epoch))
        return state, float(loss)

    return state, run, n_steps


def coordinates_log_prob():
    """A prototype NB log-pmf given the nonzeros' coordinates, ``(x, log_mean, theta, columns, values)``.

    ``columns`` / ``values`` ``(B, W)``: each cell's nonzero genes and counts
    (padding: value 0), what a CSR source holds when it densifies a minibatch.
    The log binomial coefficient is evaluated on those ``B W`` entries only and
    added into the dense terms at their coordinates; no search for nonzeros.
    Not in the library (a minibatch would have to carry its coordinates).
    """
    import jax
    import jax.numpy as jnp

    from lvmzoo.models import likelihoods as lik

    def terms(x, log_mean, theta, columns, values):
        d = log_mean - jnp.log(theta)
        shared, mean_share, theta_share = lik._log1p_exp_and_sigmoids(d)
        softplus_d = jnp.maximum(d, 0.0) + shared
        rest = -x * (jnp.maximum(-d, 0.0) + shared) - theta * softplus_d
        d_log_mean = x * theta_share - theta * mean_share
        d_theta = -softplus_d + mean_share - x * theta_share / theta
        lbc, lbc_theta = lik._log_binomial_coefficient_terms(values, theta[columns])
        rows = jnp.broadcast_to(jnp.arange(x.shape[0])[:, None], columns.shape)
        return (rest.at[rows, columns].add(lbc), d_log_mean,
                d_theta.at[rows, columns].add(lbc_theta))

    @jax.custom_jvp
    def log_prob(x, log_mean, theta, columns, values):
        return terms(x, log_mean, theta, columns, values)[0]

    @log_prob.defjvp
    def _jvp(primals, tangents):
        x, log_mean, theta, columns, values = primals
        _, log_mean_dot, theta_dot, _, _ = tangents
        value, d_log_mean, d_theta = terms(*primals)
        return value, d_log_mean * log_mean_dot + d_theta * theta_dot

    return log_prob


def isolated_log_pmf(adata, repeats: int = 25) -> dict[str, Any]:
    """The NB log-pmf's value and gradient alone on one minibatch (the first 128 cells).

    Three forms, interleaved ``repeats`` times, CPU time (median, range) of each
    call: ``dense`` (every count), ``compacted`` (the library's ``sparse=True``)
    and ``coordinates given`` (:func:`coordinates_log_prob`).  Decoder-like
    inputs: ``log mu ~ Normal(-1, 1)`` per count, ``log theta ~ Normal(0, 1)``
    per gene.
    """
    import jax
    import jax.numpy as jnp

    from lvmzoo.models.likelihoods import negative_binomial_log_prob

    csr = adata.X[:BATCH_SIZE].tocsr()
    x = jnp.asarray(csr.toarray(), jnp.float32)
    width = max(int(np.diff(csr.indptr).max()), 1)
    columns = np.zeros((csr.shape[0], width), np.int32)
    values = np.zeros((csr.shape[0], width), np.float32)
    for r in range(csr.shape[0]):
        start, stop = csr.indptr[r], csr.indptr[r + 1]
        columns[r, : stop - start] = csr.indices[start:stop]
        values[r, : stop - start] = csr.data[start:stop]
    rng = np.random.default_rng(0)
    log_mean = jnp.asarray(rng.normal(-1.0, 1.0, x.shape), jnp.float32)
    theta = jnp.asarray(np.exp(rng.normal(0.0, 1.0, x.shape[1])), jnp.float32)
    given = coordinates_log_prob()
    forms = {
        "dense": lambda lm, th, x, c, v: negative_binomial_log_prob(x, lm, th, sparse=False),
        "compacted": lambda lm, th, x, c, v: negative_binomial_log_prob(x, lm, th, sparse=True),
        "coordinates given": lambda lm, th, x, c, v: given(x, lm, th, c, v),
    }
    args = (log_mean, theta, x, jnp.asarray(columns), jnp.asarray(values))
    programs = {name: jax.jit(jax.value_and_grad(lambda *a, f=f: f(*a).sum(), argnums=(0, 1)))
                for name, f in forms.items()}
    results = {name: program(*args) for name, program in programs.items()}
    reference = results["dense"]
    agreement = {name: {
        "value_relative_difference": abs(float(r[0]) - float(reference[0])) / abs(float(reference[0])),
        "gradient_max_relative_difference": max(
            float(jnp.abs(g - h).max() / jnp.abs(h).max()) for g, h in zip(r[1], reference[1]))}
        for name, r in results.items()}
    cpu = {name: [] for name in forms}
    for _ in range(repeats):
        for name, program in programs.items():
            c0 = time.process_time()
            jax.block_until_ready(program(*args))
            cpu[name].append(time.process_time() - c0)
    print("    log-pmf alone, cpu ms: " + "  ".join(
        f"{name} {1e3 * statistics.median(t):.1f}" for name, t in cpu.items()), flush=True)
    return {"cells": int(x.shape[0]), "window": width, "cpu_seconds": cpu,
            "summary": {name: _summary(t) for name, t in cpu.items()},
            "dense_over": {name: _summary([a / b for a, b in zip(cpu["dense"], t)])
                           for name, t in cpu.items()},
            "agreement_with_dense": agreement}


BUILDERS = {"lvmzoo old": (lvmzoo_program, False), "lvmzoo new": (lvmzoo_program, True),
            "floor old": (floor_runner, False), "floor new": (floor_runner, True)}


def measure(adata, likelihood: str, rounds: int, seed: int = 0) -> dict[str, Any]:
    """Compile the four variants, then run ``rounds`` epochs of each, interleaved.

    Round 0 (each program's first run) is a warm-up and not reported.  In round
    ``r`` the variants run in an order rotated by ``r``.
    """
    programs, states, n_steps, compile_seconds = {}, {}, {}, {}
    for variant, (build, sparse) in BUILDERS.items():
        t0 = time.perf_counter()
        states[variant], programs[variant], n_steps[variant] = build(
            adata, likelihood, rounds, sparse, seed)
        compile_seconds[variant] = time.perf_counter() - t0
    seconds = {v: [] for v in VARIANTS}
    cpu_seconds = {v: [] for v in VARIANTS}
    losses = {v: [] for v in VARIANTS}
    loads = []
    for r in range(rounds + 1):
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
        loads.append(load_average())
        for variant in order:
            t0, c0 = time.perf_counter(), time.process_time()
            states[variant], loss = programs[variant](states[variant], r)
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
            if r > 0:
                seconds[variant].append(elapsed)
                cpu_seconds[variant].append(cpu)
                losses[variant].append(loss)
        if r > 0:
            print(f"    round {r}: " + "  ".join(
                f"{v} {seconds[v][-1]:.3f} s ({cpu_seconds[v][-1]:.3f} cpu)" for v in VARIANTS),
                flush=True)
    return {"epoch_seconds": seconds, "epoch_cpu_seconds": cpu_seconds, "losses": losses, "steps_per_epoch": n_steps,
            "build_and_compile_seconds": compile_seconds, "load_average_per_round": loads}


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _ratios(epoch: dict[str, list[float]]) -> dict[str, Any]:
    paired = lambda a, b: _summary([x / y for x, y in zip(epoch[a], epoch[b])])  # noqa: E731
    return {
        "epoch_seconds": {v: _summary(epoch[v]) for v in VARIANTS},
        "new_over_old": paired("lvmzoo new", "lvmzoo old"),
        "floor_new_over_floor_old": paired("floor new", "floor old"),
        "old_over_floor_old": paired("lvmzoo old", "floor old"),
        "new_over_floor_new": paired("lvmzoo new", "floor new"),
        "new_over_floor_old": paired("lvmzoo new", "floor old"),
    }


def summarise(measured: dict[str, Any]) -> dict[str, Any]:
    """Per clock (wall, and the process's CPU time over all its threads): epoch
    seconds and ratios paired per round."""
    return {
        "wall": _ratios(measured["epoch_seconds"]),
        "cpu": _ratios(measured["epoch_cpu_seconds"]),
        "loss_max_relative_difference_new_vs_old": max(
            abs(a - b) / abs(b) for a, b in zip(measured["losses"]["lvmzoo new"],
                                                measured["losses"]["lvmzoo old"])),
    }


def _fmt(s: dict[str, float], digits: int = 2) -> str:
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def render_markdown(report: dict[str, Any]) -> str:
    st = report["settings"]
    lines = [
        "# Sparse NB / ZINB log-pmf: scVI epoch time",
        "",
        "**new**: the log binomial coefficient and its derivative evaluated on the nonzero counts "
        "only, compacted into a static buffer of a quarter of the minibatch's counts "
        "(`sparse=True` in `lvmzoo/models/likelihoods.py`); **old**: on every count "
        "(`sparse=False`, the code before). "
        "lvmzoo: scVI as in `bench_scvi` (n_latent 10, n_hidden 128, 1 layer, dropout 0.1, "
        f"batch norm, gene dispersion, observed library, batch size {BATCH_SIZE}, scvi-tools' "
        "Adam), the epoch program `lvmzoo.fit` compiles (CSR data on the device, densified per "
        "minibatch). **Floor**: the same network in bare JAX (no NumPyro / Flax, dense data, no "
        "batch norm or dropout, one `lax.scan` per epoch) with the same log-pmf. "
        f"All four programs compiled first, then {st['rounds']} epochs of each, interleaved "
        "(the order rotating every round) in one process; a warm-up round before is not "
        "counted. Epoch s: median over the rounds (range in brackets); ratios paired per round, "
        "median (range). **new / old** < 1: the sparse path is faster.",
        "",
        "Clock: **wall** time of each epoch call, and **cpu**: the process's CPU time over all "
        "its threads during the call (on a shared, oversubscribed machine the CPU time a "
        "program needs moves much less with the other processes' load than its wall time).",
        "",
        "| genes | zeros | cells × steps | lik. | clock | lvmzoo old s | lvmzoo new s | floor old s "
        "| floor new s | **new / old** | floor new / floor old | old / floor old "
        "| new / floor new | new / floor old |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        d = r["data"]
        for clock in ("wall", "cpu"):
            s = r["summary"][clock]
            e = s["epoch_seconds"]
            lines.append(
                f"| {d['n_genes']:,} | {d['zero_fraction']:.1%} | {d['n_cells']:,} × "
                f"{r['measured']['steps_per_epoch']['lvmzoo old']} | {r['likelihood']} | {clock} "
                f"| {_fmt(e['lvmzoo old'], 3)} | {_fmt(e['lvmzoo new'], 3)} "
                f"| {_fmt(e['floor old'], 3)} | {_fmt(e['floor new'], 3)} "
                f"| **{_fmt(s['new_over_old'])}** "
                f"| {_fmt(s['floor_new_over_floor_old'])} | {_fmt(s['old_over_floor_old'])} "
                f"| {_fmt(s['new_over_floor_new'])} | {_fmt(s['new_over_floor_old'])} |")
    verdict = "; ".join(
        f"{r['data']['n_genes']:,} genes {r['likelihood']} "
        f"{r['summary']['cpu']['new_over_old']['median']:.2f}"
        for r in report["results"])
    wall = "; ".join(
        f"{r['data']['n_genes']:,} genes {r['likelihood']} "
        f"{r['summary']['wall']['new_over_old']['median']:.2f}" for r in report["results"])
    lines += ["", f"**Verdict** (CPU-time ratios, the steadier clock here): new / old is "
              f"{verdict} (> 1: the sparse path is slower). Wall-clock medians: {wall} (their "
              "ranges in the table are wide: the machine is oversubscribed, and a process waits "
              "for a core for most of its wall time). "
              f"Default in this run: `SPARSE_LOG_PMF = {st['default_sparse_log_pmf']}`."]
    worst = max(r["summary"]["loss_max_relative_difference_new_vs_old"] for r in report["results"])
    lines += ["", "lvmzoo old and new trained side by side from the same start on the same "
              f"minibatches: their epoch losses differ by at most {worst:.1e} relative "
              "(float32 rounding of the same values).", ""]
    if report.get("log_pmf_alone"):
        lines += [
            "The NB log-pmf's value and gradient alone, one minibatch (the first "
            f"{BATCH_SIZE} cells), CPU ms per call, median (range) of interleaved calls; "
            "**dense / form** > 1: that form is faster. *Coordinates given*: a prototype "
            "(in this script, not the library) that takes each cell's nonzero genes and "
            "counts as a CSR source holds them, so it needs no search for nonzeros.",
            "",
            "| genes | zeros | window (max nonzeros per cell) | dense ms | compacted ms "
            "| coordinates given ms | **dense / compacted** | **dense / coordinates given** |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in report["log_pmf_alone"]:
            ms = {k: {q: 1e3 * v for q, v in s.items()} for k, s in r["summary"].items()}
            lines.append(
                f"| {r['data']['n_genes']:,} | {r['data']['zero_fraction']:.1%} | {r['window']:,} "
                f"| {_fmt(ms['dense'], 1)} | {_fmt(ms['compacted'], 1)} "
                f"| {_fmt(ms['coordinates given'], 1)} | **{_fmt(r['dense_over']['compacted'])}** "
                f"| **{_fmt(r['dense_over']['coordinates given'])}** |")
        lines.append("")
    m = report["machine"]
    load = lambda v: v[0] if v else "?"  # noqa: E731
    lines.append(
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, {m['os']}; Python "
        f"{m['python']}, " + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
        + f", backend {m['jax_backend']}; {m['date']}; 1-min load average "
        f"{load(m['load_average_at_start'])} at start, {load(m['load_average_at_end'])} at the "
        "end (a shared machine: absolute seconds move with its load, ratios of interleaved "
        f"epochs much less). Benchmark wall time {report['wall_seconds'] / 60:.1f} min.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 2 rounds; writes nothing")
    parser.add_argument("--genes", default="2000,10000")
    parser.add_argument("--cells", default="1280,640", help="cells, one value or one per --genes")
    parser.add_argument("--likelihood", default="nb,zinb")
    parser.add_argument("--rounds", type=int, default=12, help="measured epochs of each variant")
    parser.add_argument("--output-dir", type=Path, default=None)
    parser.add_argument("--render", type=Path, default=None,
                        help="print the tables of an earlier run's JSON and exit")
    args = parser.parse_args(argv)
    if args.render:
        report = json.loads(args.render.read_text())
        print(render_markdown(report))
        return report
    genes = [int(g) for g in args.genes.split(",")]
    cells = [int(c) for c in args.cells.split(",")]
    if len(cells) == 1:
        cells = cells * len(genes)
    if args.quick:
        genes, cells, args.rounds = [2000], [512], 2
    output = None if args.quick else (args.output_dir or RESULTS_DIR)
    likelihood_names = args.likelihood.split(",")

    started = time.perf_counter()
    import jax

    from lvmzoo.models import likelihoods

    machine = hardware()
    machine["versions"] = {p: metadata.version(p) for p in ("jax", "numpyro", "flax", "optax")}
    machine["jax_backend"] = jax.default_backend()
    print(f"load average at start: {machine['load_average_at_start']}", flush=True)
    results, isolated = [], []
    for n_genes, n_cells in zip(genes, cells):
        adata, info = simulate(n_cells, n_genes)
        print(f"{n_genes} genes, {info['n_cells']} cells: {info['zero_fraction']:.1%} zeros",
              flush=True)
        isolated.append({"data": info, **isolated_log_pmf(adata)})
        for likelihood in likelihood_names:
            print(f"  {likelihood}", flush=True)
            measured = measure(adata, likelihood, args.rounds)
            results.append({"data": info, "likelihood": likelihood,
                            "summary": summarise(measured), "measured": measured})
    report = {
        "benchmark": "sparse_likelihood",
        "settings": {"genes": genes, "cells": cells, "likelihoods": likelihood_names,
                     "rounds": args.rounds, "batch_size": BATCH_SIZE,
                     "architecture": ARCHITECTURE, "mean_library": MEAN_LIBRARY,
                     "sparse_capacity": likelihoods._SPARSE_CAPACITY,
                     "sparse_min_entries": likelihoods._SPARSE_MIN_ENTRIES,
                     "default_sparse_log_pmf": likelihoods.SPARSE_LOG_PMF},
        "machine": {**machine, "load_average_at_end": load_average()},
        "results": results,
        "log_pmf_alone": isolated,
        "wall_seconds": time.perf_counter() - started,
    }
    markdown = render_markdown(report)
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        write_text(output / "sparse_likelihood.json", json.dumps(report, indent=2) + "\n")
        write_text(output / "sparse_likelihood.md", markdown)
    print(markdown)
    return report


if __name__ == "__main__":
    main()
