"""LLaMA-3 8B shapes (Dubey et al. 2024): 32 x 4096, GQA 32/8, 128k vocab, theta 500k."""

from gigajax.config import base_config


def get_config():
    c = base_config()
    c.model.update(vocab_size=128_256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                   mlp_dim=14_336, max_seq_len=8192, rope_theta=500_000.0, norm_eps=1e-5,
                   dtype="bfloat16", remat="full")
    c.data.update(seq_len=8192, batch_size=128)
    c.train.update(steps=100_000, eval_every=2000, checkpoint_every=1000)
    c.optim.update(lr=3e-4, warmup_steps=2000)
    return c
