"""~124M parameters (12 x 768, SwiGLU 2560, 32k vocab, tied embeddings), bf16: one-GPU baseline."""

from gigajax.config import base_config


def get_config():
    c = base_config()
    c.model.update(vocab_size=32_000, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12,
                   mlp_dim=2560, max_seq_len=2048, tie_embeddings=True, dtype="bfloat16",
                   remat="dots")
    c.attention.update(impl="blockwise", block_q=512, block_kv=512)
    c.data.update(seq_len=2048, batch_size=32)
    c.train.update(steps=20_000, eval_every=1000, checkpoint_every=1000)
    c.optim.update(lr=6e-4, warmup_steps=1000)
    return c
