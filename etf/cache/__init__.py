"""The token store: content-addressed, chunked, resumable; Zarr by default, HDF5 on request."""
