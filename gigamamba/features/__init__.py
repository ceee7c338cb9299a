"""Features: the encoder registry (timm) and the Zarr feature-grid store (`gigamamba.grid/1`)."""
