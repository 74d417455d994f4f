"""surgery.unfreeze: a whole module (the classifier head ``score`` of a sequence classifier) trains with the
adapter and travels with it: save/load, PEFT's modules_to_save both ways (against the real PEFT), restore and
delete give the original values back, merge keeps the trained ones; a module trained by hand but not unfrozen
is named when saving; bad input leaves the model as it was. In both scopes."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors import safe_open
from torch import nn

import surgery
from adapters import LoRA
from models import SCOPES, in_scope, rel_err
from surgery import errors as E
from test_errors import assert_unchanged, snapshot

WHERE = "*.{q_proj,k_proj,v_proj,o_proj}"


def classifier(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, num_labels=3, pad_token_id=0)
    return LlamaForSequenceClassification(config).eval()


def batch(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 96, (3, 7), generator=g)  # no padding id: every row ends on a real token
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


INPUTS = batch()
LABELS = torch.tensor([0, 2, 1])


def logits(model: nn.Module, inputs=INPUTS) -> torch.Tensor:
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out[0]


def scoped(scope: str, model: nn.Module) -> nn.Module:
    return in_scope(scope, model, **INPUTS)


def adapted(scope: str, base: nn.Module | None = None) -> nn.Module:
    """A classifier with LoRA on the attention projections and ``score`` unfrozen."""
    model = scoped(scope, base if base is not None else classifier())
    surgery.rewrite(model, LoRA(r=4, alpha=8), WHERE)
    surgery.unfreeze(model, "score")
    return model


def step(model: nn.Module, lr: float = 0.5, steps: int = 1) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(logits(model), LABELS)
        opt.zero_grad()
        loss.backward()
        opt.step()


def score(model: nn.Module) -> torch.Tensor:
    return model.get_submodule("score").weight


# ----- training, save/load, restore, merge -----


@pytest.mark.parametrize("scope", SCOPES)
def test_a_step_trains_score_and_a_load_on_a_fresh_base_reproduces_it(scope, tmp_path):
    eager = classifier()
    before = eager.score.weight.detach().clone()
    model = adapted(scope, eager)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert "score.weight" in trainable and all("lora_" in n or n == "score.weight" for n in trainable)
    step(model)
    assert not torch.equal(score(model), before), "a step must move score"
    if scope == "graph":  # the GraphModule trains a copy: the eager model it shares parameters with is untouched
        assert torch.equal(eager.score.weight, before)
    want = logits(model).detach()

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing trainable is left out of the file
        surgery.save(model, tmp_path / "a.safetensors")
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        meta = f.metadata()
        assert torch.equal(f.get_tensor("score.weight"), score(model).detach())
    assert json.loads(meta["unfrozen"]) == {"score": {"adapter": "default", "class": "Linear"}} and meta["version"] == "3"

    fresh = scoped(scope, classifier())
    surgery.load(fresh, tmp_path / "a.safetensors")
    assert torch.equal(logits(fresh), want)
    assert score(fresh).requires_grad and torch.equal(score(fresh), score(model))
    # and the other scope reads the same file
    other = scoped("graph" if scope == "module" else "module", classifier())
    surgery.load(other, tmp_path / "a.safetensors")
    assert rel_err(logits(other), want) < 1e-6


def test_a_file_without_unfrozen_modules_keeps_format_2(tmp_path):
    model = scoped("module", classifier())
    surgery.rewrite(model, LoRA(r=2), WHERE)
    surgery.save(model, tmp_path / "a.safetensors")
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        assert f.metadata()["version"] == "2" and "unfrozen" not in f.metadata()
        assert not [k for k in f.keys() if k.startswith("score")]


@pytest.mark.parametrize("scope", SCOPES)
def test_restore_gives_the_original_score_bitwise_and_the_original_flags(scope):
    eager = classifier()
    eager.model.embed_tokens.weight.requires_grad_(False)  # flags that are not all True
    eager.score.weight.requires_grad_(False)
    model = scoped(scope, eager)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    original = score(model).detach().clone()
    surgery.rewrite(model, LoRA(r=4), WHERE)
    surgery.unfreeze(model, "score")
    assert score(model).requires_grad
    step(model, steps=2)
    assert not torch.equal(score(model), original)
    surgery.restore(model)
    assert torch.equal(score(model), original) and score(model).dtype == original.dtype
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    if scope == "module":  # the same Parameter object, values copied back
        assert score(model) is eager.score.weight


@pytest.mark.parametrize("scope", SCOPES)
def test_merge_keeps_the_trained_score_as_a_plain_weight(scope):
    model = adapted(scope)
    step(model)
    want, trained = logits(model).detach(), score(model).detach().clone()
    surgery.merge(model)
    assert torch.equal(score(model), trained)
    assert rel_err(logits(model), want) < 1e-5
    assert not surgery.sites(model) and score(model).requires_grad  # the flag from before the rewrite


@pytest.mark.parametrize("scope", SCOPES)
def test_disabled_runs_the_original_score_and_delete_gives_it_back(scope):
    eager = classifier()
    base = logits(eager).detach()
    original = eager.score.weight.detach().clone()
    model = adapted(scope, eager)
    surgery.rewrite(model, LoRA(r=2), "*.v_proj", name="other")
    step(model)
    with torch.no_grad(), surgery.disabled(model):
        assert torch.equal(logits(model), base)
    assert not torch.equal(score(model), original)
    surgery.delete(model, "default")
    assert torch.equal(score(model), original) and not score(model).requires_grad  # frozen like the base again
    assert surgery.adapter_names(model) == ["other"]


@pytest.mark.parametrize("scope", SCOPES)
def test_a_later_rewrite_or_activate_keeps_score_training(scope):
    model = adapted(scope)
    surgery.rewrite(model, LoRA(r=2), "*.up_proj", name="more")
    surgery.activate(model, "more")
    assert score(model).requires_grad


@pytest.mark.parametrize("scope", SCOPES)
def test_save_names_a_module_trained_by_hand_without_unfreeze(scope, tmp_path):
    model = scoped(scope, classifier())
    surgery.rewrite(model, LoRA(r=4), WHERE)
    score(model).requires_grad_(True)  # the issue: trained, then silently dropped by save
    with pytest.warns(UserWarning, match=r"score\.weight.*surgery\.unfreeze\((model|gm), 'score'\)"):
        surgery.save(model, tmp_path / "a.safetensors")
    with pytest.warns(UserWarning, match=r"score\.weight"):
        surgery.export_peft(model, tmp_path / "peft")


# ----- PEFT's modules_to_save, against the real PEFT -----


@pytest.mark.parametrize("scope", SCOPES)
def test_export_peft_writes_modules_to_save_that_peft_loads(scope, tmp_path):
    from peft import PeftModel

    model = adapted(scope)
    step(model, steps=2)
    want = logits(model).detach()
    surgery.export_peft(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["score"]
    with safe_open(str(tmp_path / "peft" / "adapter_model.safetensors"), "pt") as f:
        assert "base_model.model.score.weight" in f.keys()
    peft = PeftModel.from_pretrained(classifier(), tmp_path / "peft").eval()
    with torch.no_grad():
        got = logits(peft)
    assert rel_err(got, want) < 1e-5, rel_err(got, want)
    assert torch.equal(peft.base_model.model.score.modules_to_save["default"].weight, score(model))


@pytest.mark.parametrize("scope", SCOPES)
def test_import_peft_reads_modules_to_save_from_a_trained_peft_model(scope, tmp_path):
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(classifier(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                   modules_to_save=["score"]))
    opt = torch.optim.SGD([p for p in peft.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        loss = nn.functional.cross_entropy(peft(**INPUTS).logits, LABELS)
        opt.zero_grad()
        loss.backward()
        opt.step()
    peft.eval()
    with torch.no_grad():
        want = peft(**INPUTS).logits
    peft.save_pretrained(tmp_path / "peft")
    model = scoped(scope, classifier())
    surgery.import_peft(model, tmp_path / "peft")
    assert rel_err(logits(model), want) < 1e-5, rel_err(logits(model), want)
    assert score(model).requires_grad and list(surgery.sites(model)) and surgery.restore(model) is model
    assert torch.equal(score(model), classifier().score.weight)


def test_import_peft_refuses_modules_to_save_without_their_state(tmp_path):
    model = adapted("module")
    surgery.export_peft(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    config["modules_to_save"] = ["score", "embed_tokens"]
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(config))
    fresh = classifier()
    snap = snapshot(fresh)
    with pytest.raises(E.PeftFormatError, match="modules_to_save names model.embed_tokens"):
        surgery.import_peft(fresh, tmp_path / "peft")
    assert_unchanged(fresh, snap)


# ----- bad input: our error, the rule, the value and the fix, and the model unchanged -----


def _other_file(tmp_path, scope):
    """A file whose score has 5 labels, for a base with 3."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, num_labels=5, pad_token_id=0)
    model = scoped(scope, LlamaForSequenceClassification(config).eval())
    surgery.rewrite(model, LoRA(r=4, alpha=8), WHERE)
    surgery.unfreeze(model, "score")
    surgery.save(model, tmp_path / "five.safetensors")
    return tmp_path / "five.safetensors"


def _rewritten(scope):
    model = scoped(scope, classifier())
    surgery.rewrite(model, LoRA(r=4), WHERE)
    return model


BAD = {  # id -> (build the model, the bad call, error, words of the message)
    "no-match": (_rewritten, lambda m, t: surgery.unfreeze(m, "scroe"), E.NoMatchError, ["scroe", "matches no module", "score"]),
    "a-site": (_rewritten, lambda m, t: surgery.unfreeze(m, "model.layers.0.self_attn.q_proj"), E.AlreadyRewrittenError,
               ["is the site", "q_proj", "frozen", "Unfreeze a module without sites"]),
    "holds-a-site": (_rewritten, lambda m, t: surgery.unfreeze(m, "model.layers.0"), E.AlreadyRewrittenError,
                     ["model.layers.0", "contains the site", "narrow `where`"]),
    "twice": (adapted, lambda m, t: surgery.unfreeze(m, "score"), E.AlreadyRewrittenError,
              ["score", "unfrozen already", "'default'", "Each module once"]),
    "other-name": (lambda s: (lambda m: (surgery.rewrite(m, LoRA(r=2), "*.up_proj", name="b"), m)[1])(adapted(s)),
                   lambda m, t: surgery.unfreeze(m, "score", name="b"), E.ConfigError,
                   ["score", "'b'", "unfrozen already", "surgery.delete"]),
    "unknown-name": (_rewritten, lambda m, t: surgery.unfreeze(m, "score", name="nope"), E.ConfigError,
                     ["'nope'", "no adapter of that name", "['default']"]),
    "bad-name": (_rewritten, lambda m, t: surgery.unfreeze(m, "score", name="a b"), E.ConfigError, ["'a b'", "name="]),
    "no-parameters": (_rewritten, lambda m, t: surgery.unfreeze(m, "model.layers.0.mlp.act_fn"), E.UnsupportedModuleError,
                      ["act_fn", "without parameters", "'score'"]),
    "no-adapter-yet": (lambda s: scoped(s, classifier()), lambda m, t: surgery.unfreeze(m, "score"), E.NotRewrittenError,
                       ["no adapter yet", "surgery.rewrite"]),
    "adapt-inside": (lambda s: (lambda m: (surgery.unfreeze(m, "model.layers.1.mlp"), m)[1])(_rewritten(s)),
                     lambda m, t: surgery.rewrite(m, LoRA(r=2), "*.up_proj"), E.ConfigError,
                     ["model.layers.1.mlp.up_proj", "inside model.layers.1.mlp", "trains whole", "Leave"]),
    "load-other-head": (lambda s: scoped(s, classifier()), lambda m, t: surgery.load(m, _other_file(t, "module")),
                        E.BaseMismatchError, ["score.weight", "(5, 32)", "(3, 32)"]),
}


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(case, scope, tmp_path):
    build, call, error, words = BAD[case]
    model = build(scope)
    snap = snapshot(model)
    with pytest.raises(error) as info:
        call(model, tmp_path)
    for w in words:
        assert w in str(info.value), (w, str(info.value))
    assert_unchanged(model, snap)


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("verb", ["save", "export"])
def test_a_nan_in_an_unfrozen_module_is_not_written(scope, verb, tmp_path):
    """As for adapter tensors: a file whose head would load as NaN outputs is refused, and nothing is written."""
    model = adapted(scope)
    with torch.no_grad():
        score(model)[0, 0] = float("nan")
    call = {"save": lambda: surgery.save(model, tmp_path / "a.safetensors"),
            "export": lambda: surgery.export_peft(model, tmp_path / "peft")}[verb]
    with pytest.raises(E.NonFiniteError, match=rf"cannot {verb} score.weight: NaN or Inf in the unfrozen module"):
        call()
    assert not list(tmp_path.iterdir())
