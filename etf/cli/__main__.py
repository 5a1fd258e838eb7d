"""``python -m etf.cli``: the same as the ``etf`` script (useful under ``torchrun -m``)."""

from etf.cli import main

main()
