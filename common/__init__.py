"""Small shared helpers for the five method scripts: datasets, transforms, metrics, weight files, run plumbing."""
