"""Tiny CPU default: a 4-layer byte-level model on the Python stdlib; minutes on 2 cores."""

from gigajax.config import base_config


def get_config():
    c = base_config()
    c.model.update(vocab_size=384, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, mlp_dim=384,
                   max_seq_len=256)  # dtype auto: fp32 on CPU, bf16 on GPU
    c.attention.update(impl="blockwise", block_q=128, block_kv=128)
    c.data.update(seq_len=256, batch_size=16, max_bytes=4_000_000)
    c.train.update(steps=300, log_every=10, eval_every=100, eval_batches=4, checkpoint_every=100)
    c.optim.update(lr=3e-3, warmup_steps=30)
    c.mesh.update(data=2)  # two simulated CPU devices: a real data-parallel mesh
    return c
