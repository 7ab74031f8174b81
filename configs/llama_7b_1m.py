"""7B (LLaMA-2 shapes) trained at 1M tokens of context: the GigaChat Light scale of the seed talk.

64 GPUs: FSDP over 4 and a zigzag ring over 16 (`mesh.sequence=-1`); one 1M-token sequence per
FSDP rank (4 per step, 4M tokens), bf16, full remat, the loss over 64 token slices: 57 GiB per
device by the planner (FSDP 8 x ring 8 with 8 sequences needs 76 GiB, over an 80 GB budget).
RoPE base raised to 5e7 for the long context (as LWM and LLaMA-3-style long-context recipes
do). Check the layout with `gigajax plan --config configs/llama_7b_1m.py --devices 64`. `--advise
--max-memory 80GB` ranks Ulysses x tensor with `remat=minimal` (58 GiB) about 1.3x faster by its
time model; this layout keeps 17 GiB of headroom, as the formulas under-predict XLA by 15-26% at
1M tokens (fp32 compiles, docs/design.md).
"""

from gigajax.config import base_config


def get_config():
    c = base_config()
    c.model.update(vocab_size=32_000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                   mlp_dim=11_008, max_seq_len=1_048_576, rope_theta=5e7, dtype="bfloat16",
                   remat="full")
    c.attention.update(impl="blockwise", block_q=2048, block_kv=2048, sp_impl="ring",
                       layout="zigzag")
    c.data.update(seq_len=1_048_576, batch_size=4)
    # the loss over 64 token slices: whole-sequence fp32 logits would add 40 GiB per device
    c.train.update(steps=1_000, eval_every=100, eval_batches=1, checkpoint_every=50,
                   loss_chunks=64)
    c.optim.update(lr=2e-5, warmup_steps=20, b2=0.95)
    c.mesh.update(data=1, fsdp=4, sequence=-1, tensor=1)
    return c
