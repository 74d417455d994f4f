"""IA3 equals PEFT's IA3 (peft 0.21) in both placements, and decides its side per site as PEFT does."""

import copy
import warnings

import pytest
import torch

import surgery
from adapters import IA3
from models import BERT, GPT2, LLAMA, rel_err
from peft_twin import copy_from_peft, peft_model, randomise_peft
from surgery.errors import ConfigError

# (family, our where, PEFT target_modules, PEFT feedforward_modules)
PLACEMENTS = [
    pytest.param(LLAMA, "*.{k_proj,v_proj,down_proj}", ["k_proj", "v_proj", "down_proj"], ["down_proj"], id="llama-paper"),
    pytest.param(LLAMA, "*.{q_proj,v_proj}", ["q_proj", "v_proj"], [], id="llama-qv"),
    pytest.param(GPT2, "*.{attn.c_attn,mlp.c_proj}", ["c_attn", "mlp.c_proj"], ["mlp.c_proj"], id="gpt2-conv1d"),
    # "output.dense" is a raw suffix in PEFT: it selects BERT's attention.output.dense too, on both sides
    pytest.param(BERT, "*.{attention.self.key,attention.self.value,output.dense}",
                 ["key", "value", "output.dense"], ["output.dense"], id="bert"),
]


@pytest.mark.parametrize("family, where, targets, feedforward", PLACEMENTS)
def test_ia3_matches_peft(family, where, targets, feedforward):
    from peft import IA3Config

    base = family.model()
    ours = surgery.rewrite(copy.deepcopy(base), IA3(), where)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's fan_in_fan_out notice on GPT-2's Conv1D
        pm = peft_model(base, IA3Config(target_modules=targets, feedforward_modules=feedforward))
    sites = surgery.sites(ours)
    peft_shapes = {k.removeprefix("base_model.model.").removesuffix(".ia3_l.default"): tuple(v.shape)
                   for k, v in pm.state_dict().items() if ".ia3_l." in k}
    assert peft_shapes == {p: tuple(s.ia3_l.shape) for p, s in sites.items()}, "other sites or other sides than PEFT"
    assert any(s.ia3_l.shape[0] == 1 for s in sites.values()) == bool(feedforward)

    randomise_peft(pm)
    assert copy_from_peft(pm, ours) == len(sites)
    x = family.inputs()
    theirs = family.out(pm, x)
    assert rel_err(theirs, family.out(base, x)) > 1e-3, "PEFT's adapter is still the identity"
    assert rel_err(family.out(ours, x), theirs) <= 1e-5

    merged = pm.merge_and_unload()
    surgery.merge(ours)
    sd = merged.state_dict()
    for k, v in ours.state_dict().items():
        assert rel_err(v, sd[k]) <= 1e-6, f"merged {k} differs from PEFT's"


def test_bert_suffix_semantics_put_both_output_dense_layers_on_the_input_side():
    model = surgery.rewrite(BERT.model(), IA3(), "*.output.dense")
    sides = {p: tuple(s.ia3_l.shape) for p, s in surgery.sites(model).items()}
    assert sides["encoder.layer.0.attention.output.dense"] == (1, 32)
    assert sides["encoder.layer.0.output.dense"] == (1, 48)
    only_ffn = surgery.rewrite(BERT.model(), IA3(feedforward=("layer.0.output.dense", "layer.1.output.dense")),
                               "*.output.dense")
    assert tuple(surgery.sites(only_ffn)["encoder.layer.0.attention.output.dense"].ia3_l.shape) == (32, 1)


def test_output_side_scales_the_bias_and_input_side_does_not():
    model = surgery.rewrite(GPT2.model(), IA3(), "*.h.0.{attn.c_attn,mlp.c_proj}")
    sites = surgery.sites(model)
    for path, s in sites.items():
        with torch.no_grad():
            s.ia3_l.fill_(0.0)  # l = 0 leaves exactly what IA3 does not scale
        out = s(torch.randn(3, s.d_in))
        want = torch.zeros(3, s.d_out) if path.endswith("c_attn") else s.bias.detach().expand(3, -1)
        assert torch.equal(out, want), path


def test_feedforward_config_is_checked_and_survives_save_load(tmp_path):
    with pytest.raises(ConfigError, match="tuple of non-empty module path suffixes"):
        IA3(feedforward="down_proj")
    with pytest.raises(ConfigError, match="feedforward="):
        IA3(feedforward=("down_proj", ""))
    v = IA3(feedforward=["fc_out"])
    assert v.feedforward == ("fc_out",) and hash(v)

    model = surgery.rewrite(LLAMA.model(), IA3(feedforward=("up_proj",)), "*.layers.0.mlp.{up_proj,down_proj}")
    surgery.save(model, tmp_path / "a.safetensors")
    fresh = surgery.load(LLAMA.model(), tmp_path / "a.safetensors")
    sites = surgery.sites(fresh)
    assert sites["model.layers.0.mlp.up_proj"].variant == IA3(feedforward=("up_proj",))
    assert tuple(sites["model.layers.0.mlp.up_proj"].ia3_l.shape) == (1, 32)
    assert tuple(sites["model.layers.0.mlp.down_proj"].ia3_l.shape) == (32, 1)
