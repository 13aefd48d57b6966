from .synthetic_shapes import SHAPE_CLASSES, SPLITS, register_datasets, register_synthetic_datasets

__all__ = ["SHAPE_CLASSES", "SPLITS", "register_datasets", "register_synthetic_datasets"]
