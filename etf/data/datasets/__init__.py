"""One module per dataset format; importing this package registers them all."""

from etf.data.datasets import csvfile, folder, lfw_subset  # noqa: F401
