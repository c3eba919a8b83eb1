"""Scorer kinds, one file each, behind one seam (base.py): reward models and ensembles of them."""
