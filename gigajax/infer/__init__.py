"""Inference: a trained model from a checkpoint (`loading.py`) and generation with a KV cache
(`generate.py`), the next token picked by a chooser (`choosers.py`)."""
