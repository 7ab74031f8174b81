"""SFT on a synthetic chat task: each conversation asks for a random letter string in capitals,
rendered by a tokenizer's own ChatML template (`prepare --sft --chat`) and packed whole; a tiny
model trains on the assistant turns only. Prints step / train loss / held-out loss, then the
held-out exact-match rate of greedy replies (`LM.complete(..., chat=True)`); writes JSON and PNG.

    python experiments/sft_synthetic.py --out runs/sft_synthetic --steps 1000
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

ROOT = Path(__file__).parents[1]
CHATML_TOKENIZER = ROOT / "tests" / "fixtures" / "hf" / "qwen2"  # 320-token BPE, ChatML template
TINY = ["model.d_model=64", "model.mlp_dim=128", "model.n_layers=2", "model.n_heads=4",
        "model.n_kv_heads=2", "model.vocab_size=320", "model.max_seq_len=128",
        "data.seq_len=128", "data.batch_size=16", "attention.block_q=64", "attention.block_kv=64",
        "optim.lr=3e-3", "optim.warmup_steps=20", "optim.weight_decay=0.0",
        "train.eval_batches=4", "data.source=prepared", "checkpoint.async_save=False",
        "mesh.data=-1"]


def upper_case_chats(n: int, seed: int = 0, min_letters: int = 3, max_letters: int = 8
                   ) -> list[dict[str, list[dict[str, str]]]]:
    """`n` conversations: the user gives `min_letters`..`max_letters` random lowercase letters,
    the assistant answers them in capitals (the rule)."""
    rng = np.random.default_rng(seed)
    alphabet = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    chats = []
    for _ in range(n):
        word = "".join(rng.choice(alphabet, rng.integers(min_letters, max_letters + 1)))
        chats.append({"messages": [{"role": "user", "content": f"upper {word}"},
                                   {"role": "assistant", "content": word.upper()}]})
    return chats


def run(out: Path, steps: int, chats: int = 20000, held_out: int = 200, seed: int = 0,
        progress: bool = False) -> tuple[list[dict], dict]:
    """Prepare the chats, train `steps` SFT steps; (metrics rows, held-out exact match)."""
    from gigajax.api import load, train
    from gigajax.config import load_config
    from gigajax.data.prepare import prepare

    out.mkdir(parents=True, exist_ok=True)
    records = out / "chats.jsonl"
    records.write_text("".join(json.dumps(c) + "\n" for c in upper_case_chats(chats, seed)))
    prepare([str(records)], str(CHATML_TOKENIZER), out / "data", chat=True, val_fraction=0.05,
            workers=1, progress=False, echo=None)
    shutil.rmtree(out / "run", ignore_errors=True)
    cfg = load_config(ROOT / "configs" / "tiny.py",
                      [*TINY, f"data.path={out / 'data'}", f"train.steps={steps}",
                       f"train.log_every={max(1, steps // 20)}",
                       f"train.eval_every={max(1, steps // 10)}",
                       f"train.checkpoint_every={steps}", f"train.seed={seed}"])
    train(cfg, out / "run", progress=progress)
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]

    lm = load(out / "run")
    tests = upper_case_chats(held_out, seed + 1)  # another seed: conversations never trained on
    prompts = [c["messages"][:1] for c in tests]
    replies = [g.text.strip() for g in lm.complete(prompts, max_new_tokens=12, chat=True)]
    wanted = [c["messages"][1]["content"] for c in tests]
    hits = [r == w for r, w in zip(replies, wanted, strict=True)]
    exact = {"held_out": held_out, "exact_match": float(np.mean(hits)),
             "examples": [{"prompt": p[0]["content"], "reply": r, "wanted": w}
                          for p, r, w in list(zip(prompts, replies, wanted, strict=True))[:8]]}
    return rows, exact


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/sft_synthetic")
    parser.add_argument("--steps", type=int, default=1000)
    args = parser.parse_args()
    from gigajax.parallel.devices import simulate_cpu_devices

    simulate_cpu_devices(1)
    out = Path(args.out)
    rows, exact = run(out, args.steps)
    print(f"{'step':>6} {'loss':>8} {'eval loss':>10}")
    for r in rows:
        print(f"{r['step']:>6} {r['loss']:>8.4f}"
              + (f" {r['eval_loss']:>10.4f}" if "eval_loss" in r else ""))
    print(f"held-out exact match of greedy replies: {exact['exact_match']:.3f} "
          f"({exact['held_out']} conversations)")
    for e in exact["examples"][:4]:
        print(f"  {e['prompt']!r} -> {e['reply']!r} (wanted {e['wanted']!r})")
    (out / "sft_synthetic.json").write_text(json.dumps({"rows": rows, **exact}, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train")
    ev = [r for r in rows if "eval_loss" in r]
    ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="held-out")
    ax.set(xlabel="step", ylabel="loss on assistant tokens", yscale="log",
           title=f"SFT, capitals task (exact match {exact['exact_match']:.2f})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "sft_synthetic.png", dpi=100)
    print(f"wrote {out / 'sft_synthetic.json'} and {out / 'sft_synthetic.png'}")


if __name__ == "__main__":
    main()
