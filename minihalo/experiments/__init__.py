"""Experiments that produce the committed results under notebooks/results/ (run as `python -m ...`)."""
