"""Features: the encoder registry (a native ResNet-50-trunc, any timm model) and the Zarr feature-grid store (`gigamamba.grid/1`)."""
