"""gigamamba: 2DMamba on gigapixel whole-slide images, from slides to cross-validated MLflow results."""

__version__ = "0.1.0"
