"""Stage 3: ablation grids from the cache (``grid``), their statistics (``stats``) and the
report (``report``)."""
