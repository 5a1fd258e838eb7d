"""Dataset adapters: on-disk formats to ordered samples with ids, splits and labels."""

from etf.data.base import (
    Dataset,
    Sample,
    get_adapter,
    list_datasets,
    load_dataset,
    register_dataset,
)

__all__ = ["Dataset", "Sample", "get_adapter", "list_datasets", "load_dataset", "register_dataset"]
