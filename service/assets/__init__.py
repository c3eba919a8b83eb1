"""The embedded default reward model (default-rm/), trained by scripts/train_default_model.py."""
