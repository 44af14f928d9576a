"""Zarr products: the store layout (codecs, arrays) and atomic publishing."""
