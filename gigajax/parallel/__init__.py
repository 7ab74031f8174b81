"""Parallelism: the mesh (`mesh.py`), the logical-name rule tables and the one KV-head rule
(`rules.py`), every Flax sharding call (`shardings.py`), every "does not split" check
(`checks.py`), the shard_map dispatch of attention (`attention.py`), multi-process set-up and
batch placement (`multihost.py`) and simulated CPU devices (`devices.py`)."""
