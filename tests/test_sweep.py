"""experiments/sweep_mesh.py on 8 simulated devices: 3 layouts (one the config refuses), CSV,
JSON and the Pareto PNG, with every layout reaching the same loss."""

import csv
import json
import subprocess
import sys
from pathlib import Path

from support import subprocess_env

ROOT = Path(__file__).resolve().parents[1]


def test_sweep_three_layouts(tmp_path):
    env = subprocess_env()  # the script sets 8
    result = subprocess.run(
        [sys.executable, "experiments/sweep_mesh.py", "--config", "configs/tiny.py",
         "--layouts", "data=8;fsdp=2,tensor=4;sequence=8,sp_impl=ulysses", "--remat", "none",
         "--steps", "2", "--out", str(tmp_path), "--config.model.d_model=64",
         "--config.model.mlp_dim=128", "--config.model.n_layers=2", "--config.data.seq_len=64",
         "--config.data.max_bytes=300000", "--config.attention.block_q=32",
         "--config.attention.block_kv=32"],
        cwd=ROOT, env=env, text=True, capture_output=True, timeout=600)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(open(tmp_path / "sweep.csv")))
    assert [r["layout"] for r in rows] == ["data=8", "fsdp=2,tensor=4",
                                           "sequence=8,sp_impl=ulysses"]
    good, refused = rows[:2], rows[2]
    assert "heads" in refused["error"] and not refused["tokens_per_s"]
    for r in good:
        assert float(r["tokens_per_s"]) > 0 and float(r["compiled_mb"]) > 0
        assert 0.7 < float(r["predicted_mb"]) / float(r["compiled_mb"]) < 1.3
    assert abs(float(good[0]["loss"]) - float(good[1]["loss"])) < 1e-4  # same training
    assert json.loads((tmp_path / "sweep.json").read_text())["devices"] == 8
    assert (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG"
