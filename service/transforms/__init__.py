"""Reward shaping, after the cache (which keeps the model's raw outputs): pointwise transforms of one
reward (pointwise.py), group advantages (group.py), the fits they use (fits.py), and the step that
applies them to a scorer's results (shaping.py)."""
