"""Slides: OpenSlide reading and MPP resolution, tissue detection, the global tile lattice, synthetic slides."""
