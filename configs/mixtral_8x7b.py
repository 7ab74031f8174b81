"""Mixtral 8x7B's shape (Mistral AI 2024; 46.7B parameters, 12.9B active): 32 x 4096, 32
query heads and 8 KV heads of 128, each block's MLP 8 SwiGLU experts of 14,336 of which a
token uses 2 (softmax router, top-2 weights renormalised), no shared experts, RoPE theta 1e6,
32k vocabulary. 64 GPUs: experts over 8 (one per device of a node), FSDP over 8 for the rest
of the state; 4k-token sequences, one per device, bf16, full remat. Check the layout with
`gigajax plan --config configs/mixtral_8x7b.py --devices 64`.
"""

from gigajax.config import base_config


def get_config():
    c = base_config()
    c.model.update(vocab_size=32_000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                   head_dim=128, mlp_dim=14_336, max_seq_len=32_768, rope_theta=1e6,
                   norm_eps=1e-5, dtype="bfloat16", remat="full")
    c.model.moe.update(n_routed_experts=8, top_k=2, score="softmax", renormalize=True,
                       aux_loss_weight=0.02)
    c.attention.update(impl="blockwise", block_q=512, block_kv=512)
    c.data.update(seq_len=4096, batch_size=64)
    c.train.update(steps=1_000, eval_every=100, eval_batches=1, checkpoint_every=100)
    c.optim.update(lr=1e-5, warmup_steps=20, b2=0.95)
    c.mesh.update(data=1, fsdp=8, expert=8, sequence=1, tensor=1)
    return c
