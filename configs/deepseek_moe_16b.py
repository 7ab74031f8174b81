"""DeepSeekMoE 16B's shape (Dai et al. 2024; 16.4B parameters, 2.8B active): 28 x 2048, 16
heads of 128 (no GQA), the first block a dense SwiGLU of 10,944, the other 27 with 64
fine-grained routed experts of 1,408 (top 6 by softmax, weights not renormalised) and 2
shared experts, 102,400-token vocabulary, RoPE theta 1e4. 64 GPUs: experts over 8, FSDP over
8 for the rest of the state; 4k-token sequences, one per device, bf16, full remat. Check the
layout with `gigajax plan --config configs/deepseek_moe_16b.py --devices 64`.
"""

from gigajax.config import base_config


def get_config():
    c = base_config()
    c.model.update(vocab_size=102_400, d_model=2048, n_layers=28, n_heads=16, n_kv_heads=16,
                   head_dim=128, mlp_dim=10_944, max_seq_len=4096, rope_theta=1e4,
                   norm_eps=1e-6, dtype="bfloat16", remat="full")
    c.model.moe.update(n_routed_experts=64, n_shared_experts=2, top_k=6, expert_mlp_dim=1408,
                       first_dense_layers=1, score="softmax", renormalize=False,
                       aux_loss_weight=0.001)
    c.attention.update(impl="blockwise", block_q=512, block_kv=512)
    c.data.update(seq_len=4096, batch_size=64)
    c.train.update(steps=1_000, eval_every=100, eval_batches=1, checkpoint_every=100)
    c.optim.update(lr=1e-5, warmup_steps=20, b2=0.95)
    c.mesh.update(data=1, fsdp=8, expert=8, sequence=1, tensor=1)
    return c
