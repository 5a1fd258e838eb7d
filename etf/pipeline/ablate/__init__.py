"""Stage 3: ablation grids from the cache (``grid``), their statistics (``stats``) and the
report (``report``)."""

#: joblib backends of ``--backend``, and the forms ``--subsets`` takes
BACKENDS = ("loky", "dask", "ray")
SUBSETS = "all, singles, leave-one-out, k=K or k=A..B"
#: the multiple-comparison corrections of ``--correction`` (see ``stats.adjust``)
CORRECTIONS = ("holm", "bonferroni", "fdr_bh")
