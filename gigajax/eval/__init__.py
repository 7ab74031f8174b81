"""Evaluation: long-context retrieval (PassKey)."""
