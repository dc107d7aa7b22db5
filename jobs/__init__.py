"""Entry points: each wires pipeline functions into a Dask graph and nothing else."""
