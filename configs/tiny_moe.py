"""Tiny mixture-of-experts model for CPU (DeepSeekMoE's shape in miniature): configs/tiny.py
with the MLP of blocks 2-4 replaced by 8 routed experts of width 96 (a quarter of the dense
384), 2 per token, plus 1 shared expert, so each token's MLP is 3 x 96 = 288 wide against the
dense 384. Block 1 stays dense, as DeepSeekMoE's first layer does."""

from gigajax.config import base_config


def get_config():
    c = base_config()
    c.model.update(vocab_size=384, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, mlp_dim=384,
                   max_seq_len=256)  # dtype auto: fp32 on CPU, bf16 on GPU
    c.model.moe.update(n_routed_experts=8, n_shared_experts=1, top_k=2, expert_mlp_dim=96,
                       first_dense_layers=1, aux_loss_weight=0.01)
    c.attention.update(impl="blockwise", block_q=128, block_kv=128)
    c.data.update(seq_len=256, batch_size=16, max_bytes=4_000_000)
    c.train.update(steps=300, log_every=10, eval_every=100, eval_batches=4, checkpoint_every=100)
    c.optim.update(lr=3e-3, warmup_steps=30)
    c.mesh.update(data=2)  # two simulated CPU devices: a real data-parallel mesh
    return c
