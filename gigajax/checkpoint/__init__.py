"""Checkpoints: the run's Orbax checkpoints with checksums and fallback (`manager.py`), and
params-only checkpoints for inference and fine-tuning: export, average, read (`params.py`)."""
