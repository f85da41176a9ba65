"""``lvmzoo datasets``: the bundled data sets and their shapes."""

from __future__ import annotations


def add_parser(commands) -> None:
    listing = commands.add_parser(
        "datasets", help="list the bundled data sets",
        description="List the data sets bundled with lvmzoo, with their shapes.",
    )
    listing.set_defaults(run=run, command_parser=listing)


def run(args) -> int:
    from lvmzoo.datasets import list_datasets

    for row in list_datasets():
        default = " (default)" if row["default"] else ""
        print(f"{row['name']}{default}: {row['n_obs']} cells × {row['n_vars']} genes")
        print(f"    {row['description']}")
        if row["obs_columns"]:
            print(f"    obs columns: {', '.join(row['obs_columns'])}")
        flags = {"kind": "--kind", "transform": "--transform", "gene_symbols_key": "--gene-symbols"}
        if row["registration"]:
            print("    lvmzoo fit --dataset uses: " + " ".join(
                f"{flags[key]} {value}" for key, value in row["registration"].items()))
    return 0
