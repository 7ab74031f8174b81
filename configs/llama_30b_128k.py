"""~29.9B parameters at 128k tokens of context: the GigaChat Pro scale of the seed talk.

64 x 6656, 52 query heads and 4 KV heads (GQA) of 128, SwiGLU 17,920, 32k vocabulary.
64 GPUs: FSDP over 16, tensor parallel over 4 inside a node (heads 52 / 4, KV heads 4 / 4);
one 128k sequence per FSDP rank, bf16, full remat. Check the layout with
`gigajax plan --config configs/llama_30b_128k.py --devices 64`.
"""

from gigajax.config import base_config


def get_config():
    c = base_config()
    c.model.update(vocab_size=32_000, d_model=6656, n_layers=64, n_heads=52, n_kv_heads=4,
                   head_dim=128, mlp_dim=17_920, max_seq_len=131_072, rope_theta=5e6,
                   dtype="bfloat16", remat="full")
    c.attention.update(impl="blockwise", block_q=1024, block_kv=1024)
    c.data.update(seq_len=131_072, batch_size=16)
    c.train.update(steps=1_000, eval_every=100, eval_batches=1, checkpoint_every=50)
    c.optim.update(lr=1e-5, warmup_steps=20, b2=0.95)
    c.mesh.update(data=1, fsdp=16, sequence=1, tensor=4)
    c.sharding.update(megatron_sp=True)
    return c
