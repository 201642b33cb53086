"""Datasets, reports, images and the preprocess tables."""
