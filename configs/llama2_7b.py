"""LLaMA-2 7B shapes (Touvron et al. 2023): 32 x 4096, MHA, 4k context."""

from gigajax.config import base_config


def get_config():
    c = base_config()
    c.model.update(vocab_size=32_000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                   mlp_dim=11_008, max_seq_len=4096, rope_theta=10_000.0, norm_eps=1e-5,
                   dtype="bfloat16", remat="full")
    c.data.update(seq_len=4096, batch_size=256)
    c.train.update(steps=100_000, eval_every=2000, checkpoint_every=1000)
    c.optim.update(lr=3e-4, warmup_steps=2000, b2=0.95)
    return c
