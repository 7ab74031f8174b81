"""The decoder model. Shape letters used in names and einsum strings throughout gigajax:

B batch, T sequence (queries), S sequence (keys), D model width, H query heads, K kv heads,
G = H / K query heads per kv head, E head dim, F mlp width, V vocab, L layers.
"""

from gigajax.model.decoder import Decoder

__all__ = ["Decoder"]
