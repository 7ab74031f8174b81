"""~125M-parameter GPT-2-small-sized LLaMA (12 x 768), bf16 compute: a single-GPU baseline."""

from gigajax.config import base_config


def get_config():
    c = base_config()
    c.model.update(vocab_size=384, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12,
                   mlp_dim=2048, max_seq_len=2048, dtype="bfloat16", remat="dots")
    c.attention.update(impl="blockwise", block_q=512, block_kv=512)
    c.data.update(seq_len=2048, batch_size=32)
    c.train.update(steps=20_000, eval_every=1000, checkpoint_every=1000)
    c.optim.update(lr=6e-4, warmup_steps=1000)
    return c
