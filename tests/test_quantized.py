"""Adapters on quantised bases (QLoRA): a tiny Llama saved locally and loaded with transformers'
BitsAndBytesConfig in 4-bit (nf4, fp4) and 8-bit, on the CPU. Each bitsandbytes layer is an opaque base:
the site calls it whole and never traces it.

Per variant and format: identity at init, every adapter tensor trains, save/load onto a freshly quantised
base, merge into float layers exactly (dequantize=True) or re-quantised with a warning, restore bitwise.
LoRA against PEFT 0.21's own QLoRA on the same quantised base: outputs, a training step, the merge.
Refused up front, the model unchanged: PiSSA (its residual would be re-quantised), a Linear4bit repacked for
the CPU bf16 kernel, and graph scope (a trace of a quantised model)."""

from __future__ import annotations

import warnings

import pytest
import torch

import surgery
from adapters import EVA, IA3, AntiPaSTO, DeLoRA, DoRA, HRA, LoRA, PiSSA, ROAD
from models import rel_err
from surgery import quant
from surgery.errors import ConfigError, TraceError, UnsupportedModuleError
from test_errors import assert_unchanged, snapshot

bnb = pytest.importorskip("bitsandbytes")  # a test extra: .ci/run installs it
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

WHERE = "*.{q_proj,v_proj,down_proj}"  # down_proj: IA3's input side
FORMATS = ("nf4", "fp4", "int8")
VARIANTS = {
    "lora": LoRA(r=4, alpha=8),
    "dora": DoRA(r=4, alpha=8),
    "ia3": IA3(),
    "hra": HRA(r=4),
    "delora": DeLoRA(r=4),
    "road": ROAD(variant="road_4", group_size=8),
    "antipasto": AntiPaSTO(r=4, rotate_basis="V", block_size=2),
    "eva": EVA(r=4, alpha=8),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama on disk; hidden sizes are multiples of 64, which bitsandbytes' CPU 4-bit path needs."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    return path


def load(path, fmt: str):
    """The saved Llama quantised by transformers, in training mode (an 8-bit layer computes otherwise in eval)."""
    if fmt == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=fmt, bnb_4bit_compute_dtype=torch.float32,
                                    bnb_4bit_use_double_quant=fmt == "fp4")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.float32)
    return model.train()


IDS = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(3))


def logits(model) -> torch.Tensor:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes' 8-bit matmul says it casts to float16 on every call
        return model(IDS).logits


def rewrite(model, key: str):
    calib = [{"input_ids": torch.randint(0, 96, (4, 8), generator=torch.Generator().manual_seed(s))} for s in range(3)]
    return surgery.rewrite(model, VARIANTS[key], where=WHERE, calibration=calib if key == "eva" else None)


def train(model, steps: int = 2) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps):
            model(IDS, labels=IDS).loss.backward()
            opt.step()
            opt.zero_grad()


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {f"{p}.{n}": t.detach().clone() for p, s in surgery.sites(model).items() for n, t in s.adapter_tensors().items()}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("key", VARIANTS)
def test_variant_on_quantised_base(key, fmt, saved, tmp_path):
    model = load(saved, fmt)
    base = logits(model)
    rewrite(model, key)
    sites = surgery.sites(model)
    assert len(sites) == 6 and all(s.record.quant == fmt for s in sites.values())
    assert all(isinstance(s.base, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for s in sites.values())
    assert rel_err(logits(model), base) <= 1e-6  # the adapter starts at the identity on the quantised base

    before = adapter_state(model)
    train(model)
    after = adapter_state(model)
    trainable = [f"{p}.{n}" for p, s in sites.items() for n, t in s.adapter_tensors().items() if t.requires_grad]
    assert trainable
    stuck = [k for k in trainable if torch.equal(before[k], after[k])]
    assert not stuck, f"adapter tensors that did not train: {stuck}"
    trained = logits(model)
    assert rel_err(trained, base) > 1e-4

    # the summary counts the weights a 4-bit layer packs two to a byte: the float model's count plus the adapter's
    counts = surgery.summary(model).splitlines()[-1].split("trainable ")[1].split(" parameters")[0].split(" of ")
    trainable, total = (int(c.replace(",", "")) for c in counts)
    assert total == sum(p.numel() for p in LlamaForCausalLM.from_pretrained(saved).parameters()) + trainable
    with torch.no_grad():  # no dense copy of any quantised weight is kept on the model
        assert all(t.dtype in (torch.uint8, torch.int8) for n, t in model.named_parameters() if n.endswith("base_layer.weight"))

    surgery.save(model, tmp_path / "a.safetensors")
    fresh = load(saved, fmt)
    surgery.load(fresh, tmp_path / "a.safetensors")
    assert torch.equal(logits(fresh), trained)

    with surgery.disabled(model):
        assert torch.equal(logits(model), base)

    surgery.merge(fresh, dequantize=True)
    assert not surgery.sites(fresh)
    merged = fresh.model.layers[0].self_attn.q_proj
    assert type(merged) is torch.nn.Linear and merged.weight.dtype == torch.float32
    assert rel_err(logits(fresh), trained) <= 2e-5  # float layers hold W' exactly (8-bit: its float path)

    surgery.restore(model)
    assert torch.equal(logits(model), base)
    assert type(model.model.layers[0].self_attn.q_proj) in (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_merge_requantises_in_the_same_format_and_says_how_far(fmt, saved):
    model = load(saved, fmt)
    surgery.rewrite(model, IA3(), where=WHERE)
    train(model)
    trained = logits(model)
    leaf = model.model.layers[0].self_attn.q_proj.base
    with pytest.warns(UserWarning, match=r"quantised layer\(s\) hold the merged weight quantised again") as rec:
        surgery.merge(model)
    err = float(str(next(w.message for w in rec if "quantised again" in str(w.message))).split("up to ")[1].split()[0])
    assert 0 < err < 0.2  # a re-quantisation moves each weight by at most one grid step of its block
    layer = model.model.layers[0].self_attn.q_proj
    assert type(layer) is type(leaf) and layer.weight.dtype == leaf.weight.dtype
    if fmt != "int8":
        assert layer.weight.quant_type == leaf.weight.quant_type and layer.weight.blocksize == leaf.weight.blocksize
    assert rel_err(logits(model), trained) < 0.2


@pytest.mark.parametrize("fmt", ("nf4", "int8"))
def test_lora_matches_peft_qlora(fmt, saved):
    """The same LoRA tensors on the same quantised base in PEFT and here: outputs, a step, the merge."""
    from peft import LoraConfig, get_peft_model

    ours, theirs = load(saved, fmt), load(saved, fmt)
    surgery.rewrite(ours, LoRA(r=4, alpha=8), where=WHERE)
    pm = get_peft_model(theirs, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    g = torch.Generator().manual_seed(5)
    ours_sd = ours.state_dict(keep_vars=True)
    copied = 0
    with torch.no_grad():
        for k, p in pm.named_parameters():
            if p.requires_grad:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
                mine = k.removeprefix("base_model.model.").replace(".default", "").removesuffix(".weight")
                ours_sd[mine].copy_(p)
                copied += 1
    assert copied == 12
    base = logits(load(saved, fmt))
    theirs_out = logits(pm)
    assert rel_err(theirs_out, base) > 1e-3
    assert rel_err(logits(ours), theirs_out) <= 1e-6

    for model in (ours, pm):
        train(model, steps=1)
    for k, p in pm.named_parameters():
        if p.requires_grad:
            mine = k.removeprefix("base_model.model.").replace(".default", "").removesuffix(".weight")
            assert rel_err(ours_sd[mine], p) <= 1e-5, mine

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        surgery.merge(ours)
        theirs_merged = pm.merge_and_unload()
    assert rel_err(logits(ours), logits(theirs_merged)) <= 1e-5  # both re-quantise W' the same way


def test_export_peft_of_a_qlora_loads_in_peft(saved, tmp_path):
    from peft import PeftModel

    model = load(saved, "nf4")
    surgery.rewrite(model, LoRA(r=4, alpha=8), where=WHERE)
    train(model)
    want = logits(model)
    surgery.export_peft(model, tmp_path / "peft")
    pm = PeftModel.from_pretrained(load(saved, "nf4"), tmp_path / "peft")
    pm.train()
    assert rel_err(logits(pm), want) <= 1e-6
    back = load(saved, "nf4")
    surgery.import_peft(back, tmp_path / "peft")
    assert rel_err(logits(back), want) <= 1e-6


def test_the_base_is_never_repacked_while_adapted(saved):
    model = load(saved, "nf4")
    leaf = model.model.layers[0].self_attn.q_proj
    leaf.support_avx512bf16_for_cpu = True  # as on a CPU with AVX512-BF16
    surgery.rewrite(model, LoRA(r=4), where=WHERE)
    assert leaf.support_avx512bf16_for_cpu is False
    model.eval()
    logits(model)  # an eval-mode forward without gradients: where bitsandbytes repacks
    assert not quant.repacked(leaf)
    surgery.restore(model)
    assert leaf.support_avx512bf16_for_cpu is True


def test_calibration_repacks_no_layer(saved):
    """EVA's calibration runs the model in eval mode without gradients, where bitsandbytes would repack."""
    model = load(saved, "nf4")
    attn = model.model.layers[0].self_attn
    q, k = attn.q_proj, attn.k_proj  # a site's base and a layer left out of `where`
    for leaf in (q, k):
        leaf.support_avx512bf16_for_cpu = True  # as on a CPU with AVX512-BF16
    rewrite(model, "eva")
    assert surgery.sites(model)["model.layers.0.self_attn.q_proj"].base is q
    assert not quant.repacked(q) and not quant.repacked(k)
    assert q.support_avx512bf16_for_cpu is False  # held off while it is a base
    assert k.support_avx512bf16_for_cpu is True  # given back as calibration found it


def test_refusals_leave_the_model_unchanged(saved):
    model = load(saved, "nf4")
    snap = snapshot(model)
    with pytest.raises(ConfigError, match="residual would have to be quantised again"):
        surgery.rewrite(model, PiSSA(r=4), where=WHERE)
    assert_unchanged(model, snap)

    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    leaf = model.model.layers[1].self_attn.v_proj
    w = leaf.weight  # what bitsandbytes' first eval-mode forward does on a CPU with AVX512-BF16
    w.data, w.quant_state = _convert_weight_packed_for_cpu(w.data, w.quant_state)
    packed = w.data.clone()
    modules = dict(model.named_modules())
    # no snapshot here: asking a repacked layer for its state_dict unpacks it in place
    with pytest.raises(UnsupportedModuleError, match="repacked by bitsandbytes"):
        surgery.rewrite(model, LoRA(r=4), where=WHERE)
    assert dict(model.named_modules()) == modules and not surgery.sites(model)
    assert quant.repacked(leaf) and torch.equal(leaf.weight.data, packed)

    with pytest.raises(TraceError, match="cannot capture a quantised model"):
        surgery.trace(load(saved, "nf4"), input_ids=IDS)


def _torchao_int8(model):
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(model, Int8WeightOnlyConfig())
    return "Int8Tensor"


def _quanto_int8(model):
    from optimum.quanto import freeze, qint8, quantize

    quantize(model, weights=qint8)
    freeze(model)
    return "QLinear from optimum"


@pytest.mark.parametrize("quantise", [_torchao_int8, _quanto_int8], ids=["torchao", "optimum-quanto"])
def test_other_quantisers_are_refused_up_front(quantise):
    """They train by accident and would merge silently re-quantised or not at all: refused by our own error."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
    what = quantise(model)
    x = torch.randn(3, 64)
    with torch.no_grad():
        want = model(x)
    # test_errors.snapshot reads each tensor's bits, which torchao's Int8Tensor cannot show: objects and outputs
    modules, params = dict(model.named_modules()), dict(model.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    with pytest.raises(UnsupportedModuleError, match=f"{what}.*bitsandbytes 4-bit"):
        surgery.rewrite(model, LoRA(r=4), where="0")
    assert dict(model.named_modules()) == modules and dict(model.named_parameters()) == params
    assert not surgery.sites(model) and {n: p.requires_grad for n, p in params.items()} == flags
    with torch.no_grad():
        assert torch.equal(model(x), want)
    with pytest.raises(TraceError, match="cannot capture a quantised model"):
        surgery.trace(model, torch.randn(2, 64))


def test_an_adapter_moves_between_a_quantised_base_and_its_float_model(saved, tmp_path):
    """LoRA trained on nf4 loads onto the float model with a warning that names the quantisation (it only adds
    to the base); DoRA, whose magnitude was computed from the quantised weight, is refused."""
    for variant in (LoRA(r=4), DoRA(r=4)):
        model = load(saved, "nf4")
        surgery.rewrite(model, variant, where=WHERE)
        train(model)
        surgery.save(model, tmp_path / "q.safetensors")
        float_model = LlamaForCausalLM.from_pretrained(saved)
        if isinstance(variant, DoRA):
            snap = snapshot(float_model)
            with pytest.raises(surgery.errors.BaseMismatchError, match="saved on a Linear4bit .* has a Linear there"):
                surgery.load(float_model, tmp_path / "q.safetensors")
            assert_unchanged(float_model, snap)
        else:
            with pytest.warns(UserWarning, match="weights differ by the quantisation"):
                surgery.load(float_model, tmp_path / "q.safetensors")
            assert surgery.sites(float_model)


def test_diff_of_a_qlora_model(saved):
    """The 4-bit leaf is one call on both sides (never traced), and its weights keep their keys in the table."""
    import copy

    model = load(saved, "nf4")
    before = copy.deepcopy(model)
    surgery.rewrite(model, LoRA(r=4), where="*.q_proj")
    d = surgery.diff(before, model)
    assert d.sites == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    text = str(d)
    assert "Linear4bit -> Site" in text and "base_layer" in text
    changed = {c.path for c in d.weights}
    assert changed == {f"model.layers.{i}.self_attn.q_proj.lora_{x}" for i in (0, 1) for x in "AB"}


def test_an_8bit_layer_that_keeps_float_weights():
    """Linear8bitLt(has_fp16_weights=True) holds its weight in float: read as it is, merged back the same way."""
    torch.manual_seed(0)
    layer = bnb.nn.Linear8bitLt(64, 32, bias=True, has_fp16_weights=True, threshold=6.0)
    layer.weight = bnb.nn.Int8Params(torch.randn(32, 64), requires_grad=False, has_fp16_weights=True)
    model = torch.nn.Sequential(layer).to("cpu")
    x = torch.randn(3, 64)
    with torch.no_grad():
        base = model(x)
    surgery.rewrite(model, LoRA(r=2), where="0")
    assert torch.equal(quant.dequantized(layer), layer.weight.float())
    with torch.no_grad():
        assert torch.equal(model(x), base)
        for t in surgery.sites(model)["0"].adapter_tensors().values():
            t.add_(0.1)
        adapted = model(x)
    W, b = surgery.sites(model)["0"].fold()
    surgery.merge(model, dequantize=True)
    assert type(model[0]) is torch.nn.Linear
    assert torch.equal(model[0].weight, W) and torch.equal(model[0].bias, b)
    with torch.no_grad():  # the layer's own forward quantises its float weight to int8 for every matmul
        assert rel_err(model(x), adapted) <= 1e-2


def _layer(fmt: str, d_out: int, d_in: int, dtype=torch.float32, nested=False, blocksize=64, storage=torch.uint8):
    torch.manual_seed(d_out * d_in)
    W = torch.randn(d_out, d_in).to(dtype)
    if fmt == "int8":
        layer = bnb.nn.Linear8bitLt(d_in, d_out, bias=False, has_fp16_weights=False, device="meta")
        layer.weight = bnb.nn.Int8Params(W, requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(d_in, d_out, bias=False, compute_dtype=dtype, compress_statistics=nested,
                                  quant_type=fmt, quant_storage=storage, device="meta")
        layer.weight = bnb.nn.Params4bit(W, requires_grad=False, quant_type=fmt, blocksize=blocksize,
                                         compress_statistics=nested, quant_storage=storage)
    return layer.to("cpu")


@pytest.mark.parametrize("fmt,shape,dtype,nested,blocksize,storage", [
    ("nf4", (96, 64), torch.float32, False, 64, torch.uint8),
    ("nf4", (48, 128), torch.float32, True, 64, torch.uint8),  # statistics quantised too
    ("fp4", (96, 256), torch.bfloat16, True, 128, torch.uint8),
    ("nf4", (64, 64), torch.float16, False, 64, torch.uint8),
    ("nf4", (64, 128), torch.float32, False, 64, torch.bfloat16),  # packed into bf16 storage (FSDP-QLoRA's)
    ("nf4", (48, 96), torch.float32, False, 64, torch.uint8),  # a width that is no multiple of the block: decoded whole
    ("nf4", (16, 33), torch.float32, False, 64, torch.uint8),  # an odd width (bnb's other path; decoded whole)
    ("int8", (48, 96), torch.float32, False, 64, torch.uint8),
])
def test_a_few_entries_are_the_whole_dequantised_weights_entries(fmt, shape, dtype, nested, blocksize, storage):
    """What the save and load base checks read: entries of W, decoded from only the blocks that hold them,
    bit for bit those of the whole decoded W (ends, repeats and neighbours in one block included)."""
    layer = _layer(fmt, *shape, dtype=dtype, nested=nested, blocksize=blocksize, storage=storage)
    n = shape[0] * shape[1]
    idx = torch.cat([torch.tensor([0, n - 1, 5, 5, 6, n // 2]), torch.randint(0, n, (40,))])
    whole = quant.dequantized(layer).reshape(-1)
    got = quant.dequantized_at(layer, idx)
    assert got.dtype == torch.float32 and torch.equal(got, whole[idx])
    assert not torch.equal(got, torch.zeros_like(got))


@pytest.mark.parametrize("key", ["lora", "dora"])
def test_a_4bit_weight_packed_into_bfloat16_storage(key, saved, tmp_path):
    """bnb_4bit_quant_storage=torch.bfloat16 (how FSDP-QLoRA loads a base) keeps the packed bytes in a float
    tensor: W is still read by decoding them (DoRA's norm at init, the fold at merge, the base check at load),
    and the packed tensor is no weight-space target."""
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                                bnb_4bit_quant_storage=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(saved, quantization_config=config, dtype=torch.float32).train()
        again = AutoModelForCausalLM.from_pretrained(saved, quantization_config=config, dtype=torch.float32).train()
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    snap = snapshot(model)
    with pytest.raises(UnsupportedModuleError, match="packed quantised weight"):
        surgery.rewrite(model, VARIANTS[key], where="*.q_proj.weight")
    assert_unchanged(model, snap)
    base = logits(model)
    rewrite(model, key)
    assert rel_err(logits(model), base) <= 1e-6
    with torch.no_grad():
        for s in surgery.sites(model).values():
            for t in s.adapter_tensors().values():
                t.add_(0.02)
    adapted = logits(model)
    surgery.save(model, tmp_path / "a.safetensors")
    surgery.load(again, tmp_path / "a.safetensors")
    assert torch.equal(logits(again), adapted)
    surgery.merge(model, dequantize=True)
    assert rel_err(logits(model), adapted) <= 1e-5


def test_torch_save_of_a_whole_qlora_model(saved, tmp_path):
    """LoRA beside a 4-bit base goes through torch.save / torch.load whole; DoRA, whose forward dequantises the base
    at every step, is refused when saved (its code could not be traced again on load), with the way that works."""
    model = load(saved, "nf4")
    rewrite(model, "lora")
    want = logits(model)
    torch.save(model, tmp_path / "lora.pt")
    again = torch.load(tmp_path / "lora.pt", weights_only=False)
    assert torch.equal(logits(again), want) and list(surgery.sites(again)) == list(surgery.sites(model))
    dora = load(saved, "nf4")
    rewrite(dora, "dora")
    with pytest.raises(TraceError, match=r"cannot pickle the site at .*surgery\.save"):
        torch.save(dora, tmp_path / "dora.pt")
