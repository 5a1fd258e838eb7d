"""The store's on-disk constants, importable without zarr or torch (the command line lists them)."""

#: Version 2: every chunk carries a checksum (Zarr v3 ``crc32c`` codec, HDF5 ``fletcher32``
#: filter). Version 1 stores (no checksums) are still read; ``etf cache verify`` says so.
FORMAT_VERSION = 2
#: format versions this etf reads
READABLE_VERSIONS = (1, 2)
#: what ``etf cache info`` and ``verify`` say of a version 1 store
NO_CHECKSUMS = (
    "a same-size change to a chunk cannot be detected (format version 1); "
    "delete the store and re-run etf extract to add them"
)
FORMATS = {"zarr": ".zarr", "hdf5": ".h5"}
#: Bytes per Zarr chunk (and resume unit). See bench/README.md for the measurements.
ZARR_CHUNK_BYTES = 8 << 20
#: Bytes per HDF5 chunk; smaller than Zarr's because HDF5 reads through its own chunk cache.
HDF5_CHUNK_BYTES = 2 << 20
CODECS = ("none", "zstd", "blosc-zstd", "blosc-lz4")
#: How each storage dtype sits on disk. bfloat16 has no NumPy/Zarr/HDF5 type: its bits are
#: stored as uint16, and float32 is ``bits << 16`` (see :func:`decode_tokens`).
PHYSICAL = {"float16": "float16", "float32": "float32", "bfloat16": "uint16"}
#: storage dtypes (``--dtype``)
DTYPES = tuple(PHYSICAL)
#: store-spec fields that name the data, not the encoder: the only ones that may differ
#: between two datasets' stores of one prior
DATASET_FIELDS = ("dataset_key", "n", "tokens_sha256", "ids_sha256")
#: store-spec fields only training reads: a store's view 0 is the same with or without its views
VIEW_FIELDS = ("views",)
#: a prior's own pooling, as a store's layout records it (timm's ``global_pool`` names): the
#: first prefix (class) token, or the mean, max or mean of mean and max of the patch tokens
POOLS = ("token", "avg", "max", "avgmax")
#: what ``--pool`` may ask for instead: a stored pooling, or ``token+avg`` (the class token and
#: the patch mean concatenated: dinov2's linear-evaluation representation)
POOL_OVERRIDES = (*POOLS, "token+avg")
