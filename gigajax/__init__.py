"""gigajax: long-context LLaMA-style decoder training in JAX/Flax on named mesh axes."""

__version__ = "0.1.0"
