"""Data sources. Each returns tensors + labels (+ evidence masks where known)."""
