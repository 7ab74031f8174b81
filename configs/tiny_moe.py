"""Tiny mixture-of-experts model for CPU (DeepSeekMoE's shape in miniature): configs/tiny.py
with the MLP of blocks 2-4 replaced by 8 routed experts of width 96 (a quarter of the dense
384), 2 per token, plus 1 shared expert, so each token's MLP is 3 x 96 = 288 wide against the
dense 384. Block 1 stays dense, as DeepSeekMoE's first layer does."""

from pathlib import Path

from gigajax.config import load_config


def get_config():
    c = load_config(Path(__file__).with_name("tiny.py"))
    c.model.moe.update(n_routed_experts=8, n_shared_experts=1, top_k=2, expert_mlp_dim=96,
                       first_dense_layers=1, aux_loss_weight=0.01)
    return c
