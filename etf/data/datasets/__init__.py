"""One module per dataset format; importing this package registers them all."""

from etf.data.datasets import cfp, csvfile, folder, lfw, lfw_subset  # noqa: F401
