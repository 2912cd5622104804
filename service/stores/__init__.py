"""Stores on the shared volume: the artifact store layout, bases, datasets, coefficient sets, label sets."""
