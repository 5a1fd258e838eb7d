"""One module per dataset format; importing this package registers them all."""

from etf.data.datasets import (  # noqa: F401
    csvfile,
    folder,
    lfw_subset,
)
