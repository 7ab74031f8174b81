"""Experiment configs: one `get_config()` per file, data and arithmetic only."""
