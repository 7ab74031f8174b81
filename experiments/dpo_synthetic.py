"""DPO on the synthetic preference task (`data/synthetic.preference_records`): train a tiny model
from its seeded initialisation (the reference) and print step / loss / reward margin / accuracy,
train and held-out; writes JSON and a PNG curve.

    python experiments/dpo_synthetic.py --out runs/dpo_synthetic --steps 300
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

TINY = ["model.d_model=32", "model.mlp_dim=64", "model.n_layers=2", "model.n_heads=2",
        "model.n_kv_heads=2", "model.vocab_size=262", "model.max_seq_len=64",
        "data.seq_len=64", "data.batch_size=8", "attention.block_q=32", "attention.block_kv=32",
        "optim.lr=3e-3", "optim.warmup_steps=10", "optim.weight_decay=0.0",
        "train.eval_batches=4", "train.objective=dpo", "dpo.beta=0.5",
        "data.source=prepared", "checkpoint.async_save=False", "mesh.data=1"]


def run(out: Path, steps: int, pairs: int = 2000, seed: int = 0, progress: bool = False
        ) -> list[dict]:
    """Prepare the pairs, train `steps` DPO steps; the metrics rows (train and eval)."""
    from gigajax.api import train
    from gigajax.config import load_config
    from gigajax.data.prepare import prepare
    from gigajax.data.synthetic import preference_records

    out.mkdir(parents=True, exist_ok=True)
    records = out / "pairs.jsonl"
    records.write_text("".join(json.dumps(r) + "\n" for r in preference_records(pairs, seed)))
    prepare([str(records)], "byte", out / "data", dpo=True, val_fraction=0.1, workers=1,
            progress=False, echo=None)
    shutil.rmtree(out / "run", ignore_errors=True)
    cfg = load_config(Path(__file__).parents[1] / "configs" / "tiny.py",
                      [*TINY, f"data.path={out / 'data'}", f"train.steps={steps}",
                       f"train.log_every={max(1, steps // 20)}",
                       f"train.eval_every={max(1, steps // 10)}",
                       f"train.checkpoint_every={steps}", f"train.seed={seed}"])
    train(cfg, out / "run", progress=progress)
    return [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/dpo_synthetic")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    from gigajax.parallel.devices import simulate_cpu_devices

    simulate_cpu_devices(1)
    out = Path(args.out)
    rows = run(out, args.steps)
    print(f"{'step':>6} {'loss':>8} {'margin':>8} {'acc':>6} {'eval loss':>10} {'eval acc':>9}")
    for r in rows:
        print(f"{r['step']:>6} {r['loss']:>8.4f} {r['reward_margin']:>8.3f} {r['accuracy']:>6.2f}"
              + (f" {r['eval_loss']:>10.4f} {r['eval_accuracy']:>9.2f}" if "eval_loss" in r
                 else ""))
    (out / "dpo_synthetic.json").write_text(json.dumps(rows, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train")
    ev = [r for r in rows if "eval_loss" in r]
    a.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="held-out")
    a.axhline(0.6931, ls=":", c="gray")
    a.set(xlabel="step", ylabel="DPO loss", title="loss (ln 2 at step 0)")
    a.legend()
    b.plot([r["step"] for r in rows], [r["accuracy"] for r in rows], label="train")
    b.plot([r["step"] for r in ev], [r["eval_accuracy"] for r in ev], "o-", label="held-out")
    b.set(xlabel="step", ylabel="preference accuracy", ylim=(0, 1.02))
    b.legend()
    fig.tight_layout()
    fig.savefig(out / "dpo_synthetic.png", dpi=100)
    print(f"wrote {out / 'dpo_synthetic.json'} and {out / 'dpo_synthetic.png'}")


if __name__ == "__main__":
    main()
