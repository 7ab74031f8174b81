"""Hugging Face import and export of the mixtures of experts, Mixtral and Qwen3-MoE: the
committed fixtures' logits (test_hf.py checks them on one device, with the round trip and bad
inputs) under expert-parallel layouts, a control that a wrong expert mapping fails, the config
each imports as, and the models that cannot be exported refused by name."""


import numpy as np
import pytest
from test_hf import FIXTURES, FP32, LOGIT_ATOL, hf_config, reference, swapped_table

import gigajax
from gigajax.checkpoint import hf
from gigajax.config import ModelConfig, load_config
from gigajax.config.hf import from_hf_config, to_hf_config
from gigajax.errors import ConfigError
from gigajax.eval.logits import logits_under_layout

ROOT = FIXTURES.parents[2]
EP_LAYOUTS = {"expert=2": {"mesh.expert": 2},
              "expert=2,tensor=2": {"mesh.expert": 2, "mesh.tensor": 2},
              "expert=2,sequence=2": {"mesh.expert": 2, "mesh.sequence": 2}}


@pytest.mark.parametrize("layout", EP_LAYOUTS)
@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_imported_moe_logits_equal_transformers_under_expert_parallel_layouts(name, layout):
    """The experts split over `expert` (and their width over `tensor`, the tokens over a ring)
    give transformers' logits: the all-to-all dispatch of an imported model."""
    tokens, expected = reference(name)
    logits = logits_under_layout(FIXTURES / name, tokens, {**FP32, **EP_LAYOUTS[layout]})
    assert np.abs(logits - expected).max() <= LOGIT_ATOL


def test_a_wrong_expert_mapping_fails_the_parity_test(monkeypatch):
    """Control: Mixtral's w1 (gate) and w3 (up) read the other way round are far outside the
    tolerance, as are the experts read one index off."""
    tokens, expected = reference("mixtral")
    table = hf.tensor_table
    monkeypatch.setattr(hf, "tensor_table", swapped_table(
        table, ("moe_blocks", "mlp", "w_gate"), ("moe_blocks", "mlp", "w_up")))
    lm = gigajax.load(FIXTURES / "mixtral", "model.dtype=float32")
    assert np.abs(lm.logits(tokens) - expected).max() > 1e-2

    class NextExpert(hf.Tensor):
        """Expert j read from the file's expert j + 1."""

        def name(self, *position: int) -> str:
            return super().name(*position[:-1], (position[-1] + 1) % self.experts)

    monkeypatch.setattr(hf, "tensor_table", lambda cfg: [
        NextExpert(**vars(r)) if r.experts else r for r in table(cfg)])
    lm = gigajax.load(FIXTURES / "mixtral", "model.dtype=float32")
    assert np.abs(lm.logits(tokens) - expected).max() > 1e-2


def test_the_moe_configs_import_as_gigajax_moe_models():
    mixtral = from_hf_config(hf_config("mixtral")).model
    assert (mixtral.mlp_dim, mixtral.sliding_window, mixtral.qk_norm) == (64, 16, False)
    assert {k: mixtral.moe[k] for k in ("n_routed_experts", "top_k", "expert_mlp_dim",
                                        "first_dense_layers", "n_shared_experts", "renormalize",
                                        "score")} == {
        "n_routed_experts": 4, "top_k": 2, "expert_mlp_dim": 64, "first_dense_layers": 0,
        "n_shared_experts": 0, "renormalize": True, "score": "softmax"}
    # transformers' balance loss is top_k (2) when balanced, ours 1: twice the coefficient
    assert mixtral.moe.aux_loss_weight == 2 * hf_config("mixtral")["router_aux_loss_coef"]
    qwen = from_hf_config(hf_config("qwen3_moe")).model
    assert (qwen.mlp_dim, qwen.qk_norm, qwen.head_dim) == (128, True, 16)
    assert (qwen.moe.n_routed_experts, qwen.moe.expert_mlp_dim, qwen.moe.first_dense_layers,
            qwen.moe.renormalize) == (8, 32, 1, True)
    off = {**hf_config("qwen3_moe"), "norm_topk_prob": False}
    assert from_hf_config(off).model.moe.renormalize is False
    windowed = {**hf_config("qwen3_moe"), "use_sliding_window": True, "sliding_window": 16}
    assert from_hf_config(windowed).model.sliding_window == 16  # every layer, as transformers
    assert from_hf_config({**windowed, "use_sliding_window": False}).model.sliding_window == 0


def test_the_converted_moe_counts_parameters_without_the_routing_bias(tmp_path):
    written = gigajax.from_hf(FIXTURES / "qwen3_moe", tmp_path / "g")
    sizes = [np.prod(spec.hf_shape) for spec in hf.tensor_table(ModelConfig.from_config(
        gigajax.load_config(FIXTURES / "qwen3_moe"))) for _ in spec.names()]
    assert written["num_params"] == sum(sizes)


def tiny_moe(*overrides: str):
    return load_config(ROOT / "configs" / "tiny_moe.py", [f"--config.{o}" for o in overrides])


@pytest.mark.parametrize("overrides,words", [
    ((), "model.moe.n_shared_experts=1"),
    (("model.moe.n_shared_experts=0", "model.moe.score=sigmoid"), "model.moe.score='sigmoid'"),
    (("model.moe.n_shared_experts=0",), "model.moe.first_dense_layers=1"),
    (("model.moe.n_shared_experts=0", "model.moe.first_dense_layers=0",
      "model.moe.renormalize=False"), "model.moe.renormalize=False"),
    (("model.moe.n_shared_experts=0", "model.qkv_bias=True"), "model.qkv_bias=True"),
])
def test_moe_models_hf_cannot_express_are_refused_by_field(overrides, words):
    with pytest.raises(ConfigError, match="cannot export") as error:
        to_hf_config(tiny_moe(*overrides), "float32", {})
    assert words in str(error.value)


def test_exportable_moe_models_pick_mixtral_or_qwen3_moe():
    mixtral = to_hf_config(tiny_moe("model.moe.n_shared_experts=0",
                                    "model.moe.first_dense_layers=0"), "float32", {})
    assert (mixtral["architectures"], mixtral["intermediate_size"],
            mixtral["num_local_experts"]) == (["MixtralForCausalLM"], 96, 8)
    qwen = to_hf_config(tiny_moe("model.moe.n_shared_experts=0", "model.qk_norm=True"),
                        "float32", {})
    assert (qwen["architectures"], qwen["mlp_only_layers"], qwen["moe_intermediate_size"],
            qwen["intermediate_size"]) == (["Qwen3MoeForCausalLM"], [0], 96, 384)
    assert from_hf_config(qwen).model.moe.first_dense_layers == 1


def test_a_trained_routing_bias_is_refused_at_export():
    """Mixtral and Qwen3-MoE route without a bias: exporting one would change the routing."""
    cfg = ModelConfig.from_config(gigajax.load_config(FIXTURES / "mixtral"))
    params = hf.hf_params(FIXTURES / "mixtral", cfg)
    assert len(list(hf.hf_tensors(params, cfg, np.dtype(np.float32)))) == len(
        list(hf.hf_shapes(cfg)))
    params["moe_blocks"]["mlp"]["routing_bias"] = np.full((2, 4), 0.01, np.float32)
    with pytest.raises(ConfigError, match="routing bias is not zero"):
        list(hf.hf_tensors(params, cfg, np.dtype(np.float32)))
