"""Inference: a trained model from a checkpoint (`loading.py`) and generation with a KV cache
(`generate.py`, `loop.py`): greedy, sampling, beam and contrastive search, token healing."""
