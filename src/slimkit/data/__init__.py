"""Datasets: the built-in ``digits``, user ``.npz`` files and image folders."""

from .datasets import Splits, calibration_subset, first_samples, load_data, make_loader

__all__ = ["Splits", "calibration_subset", "first_samples", "load_data", "make_loader"]
