"""TRL's trainers on a rewritten model: SFTTrainer checkpoints hold the adapter and resume exactly; DPOTrainer takes
its reference log-probs from the same model under `surgery.disabled` (surgery.hf.reference), with no second copy."""

from __future__ import annotations

import gc
import math

import pytest
import torch

# trl is in the test extra: a missing install fails here instead of skipping the file
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
from trl.trainer.utils import add_fused_lm_head

import surgery
import surgery.hf
from adapters import LoRA
from models import LLAMA
from surgery.errors import ConfigError, NotRewrittenError
from surgery.hf import ADAPTER_FILE


def tokenizer():
    """A word-level tokenizer built here (nothing to download): word "t7" is token 7; "#" pads, "|" ends."""
    vocab = {"#": 0, "|": 1, "?": 2, **{f"t{i}": i for i in range(3, LLAMA.vocab)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="#", eos_token="|", unk_token="?")


def rewritten():
    model = LLAMA.model()
    surgery.rewrite(model, LoRA(r=4, alpha=8), LLAMA.where)
    return model


def adapter(model):
    return {f"{p}.{n}": t.detach().clone() for p, s in surgery.sites(model).items()
            for n, t in s.adapter_tensors().items()}


def common(out, **kw):
    # bf16=False: TRL's configs default to bf16 mixed precision, under which accelerate runs the forward in CPU
    # autocast; float32 keeps the run comparable bit for bit with a plain base forward
    return dict(bf16=False, output_dir=str(out), per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
                use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0, **kw)


def sft(model, out):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, LLAMA.vocab, (16, 8), generator=g).tolist()
    data = Dataset.from_dict({"input_ids": ids})  # pre-tokenised: SFTTrainer skips its tokenizer
    args = SFTConfig(**common(out, max_steps=4, save_steps=2, logging_steps=100))
    return SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer())


def test_sft_trainer_checkpoints_hold_the_adapter_and_resume_exactly(tmp_path):
    whole = rewritten()
    init = adapter(whole)
    sft(whole, tmp_path / "a").train()
    ckpt = tmp_path / "a" / "checkpoint-2"
    assert (ckpt / ADAPTER_FILE).is_file() and (ckpt / "config.json").is_file()
    weights = ("model.", "model-0", "pytorch_model", "adapter_model")
    assert not [p.name for p in ckpt.iterdir() if p.name.startswith(weights)]
    full = sum(t.numel() * t.element_size() for t in LLAMA.model().state_dict().values())
    assert (ckpt / ADAPTER_FILE).stat().st_size < full / 4

    at_step_2 = rewritten()
    surgery.restore(at_step_2)
    surgery.load(at_step_2, ckpt)
    final, middle = adapter(whole), adapter(at_step_2)
    # training moved the adapter between the checkpoint and the end, so an exact resume is not trivially equal
    assert not torch.equal(middle["model.layers.0.self_attn.k_proj.lora_B"], init["model.layers.0.self_attn.k_proj.lora_B"])
    assert any(not torch.equal(final[k], middle[k]) for k in final)

    resumed = rewritten()  # a fresh base, rewritten the same way
    surgery.resumable(sft(resumed, tmp_path / "b")).train(resume_from_checkpoint=str(ckpt))
    theirs = adapter(resumed)
    assert final.keys() == theirs.keys()
    assert all(torch.equal(final[k], theirs[k]) for k in final), \
        max((final[k] - theirs[k]).abs().max().item() for k in final)


def preferences(n=8):
    g = torch.Generator().manual_seed(5)

    def words(k):
        return " ".join(f"t{i}" for i in torch.randint(3, LLAMA.vocab, (k,), generator=g).tolist())

    rows = [{"prompt": words(5), "chosen": " " + words(4), "rejected": " " + words(3)} for _ in range(n)]
    return Dataset.from_list(rows)


def live_llamas():
    gc.collect()
    return sum(isinstance(o, LlamaForCausalLM) for o in gc.get_objects())


def test_dpo_trainer_reference_is_the_same_model_with_adapters_off(tmp_path, monkeypatch):
    import trl.trainer.dpo_trainer as dpo

    def no_second_model(*a, **k):
        raise AssertionError("DPOTrainer loaded a second model")

    monkeypatch.setattr(dpo, "create_model_from_path", no_second_model)
    policy = rewritten()
    base = LLAMA.model()  # the same base weights, computed separately (not a copy held by the trainer)
    add_fused_lm_head(base)  # TRL scores through this head; the base gets the same one
    before = live_llamas()

    args = DPOConfig(**common(tmp_path, max_steps=3, logging_steps=1, save_strategy="no", beta=0.5))
    trainer = DPOTrainer(model=policy, ref_model=surgery.hf.reference(policy), args=args, train_dataset=preferences(),
                         processing_class=tokenizer())
    assert sum(p.numel() for p in trainer.ref_model.parameters()) == 0
    assert sum(b.numel() for b in trainer.ref_model.buffers()) == 0

    seen = []  # every reference call of the run: its inputs and what it returned
    reference = trainer.ref_model

    def recording(*a, **k):
        out = reference(*a, **k)
        seen.append((k, out.log_probs.clone()))
        return out

    trainer.ref_model = recording
    trainer.train()
    assert live_llamas() == before, "a copy of the model was made"
    assert len(seen) == 3

    with torch.no_grad():
        for k, ref in seen:
            want = base(**k).log_probs
            assert torch.equal(ref, want)  # bit for bit the base, at every step
        drifted = policy(**seen[-1][0]).log_probs
    assert not torch.equal(drifted, seen[-1][1])  # while the policy itself moved away from it
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert abs(losses[0] - math.log(2)) < 1e-6  # at step 0 (B = 0) policy and reference agree exactly
    assert any(not torch.equal(t, torch.zeros_like(t)) for k, t in adapter(policy).items() if k.endswith("lora_B"))
    with surgery.disabled(policy):
        bases = policy.state_dict()
    assert all(torch.equal(t, base.state_dict()[k]) for k, t in bases.items())  # the base weights never moved


def test_reference_refuses_a_model_without_sites_or_with_an_adapted_output_head():
    with pytest.raises(NotRewrittenError):
        surgery.hf.reference(LLAMA.model())
    model = LLAMA.model()
    surgery.rewrite(model, LoRA(r=4), "lm_head")
    with pytest.raises(ConfigError, match="lm_head"):
        surgery.hf.reference(model)


def test_dpo_trainer_precomputed_reference_log_probs_are_the_base_model(tmp_path):
    policy = rewritten()
    with torch.no_grad():  # an adapter away from its init, so "adapters on" is not the base
        for s in surgery.sites(policy).values():
            s.lora_B.normal_(0, 0.1)
    args = DPOConfig(**common(tmp_path, max_steps=1, save_strategy="no", precompute_ref_log_probs=True))
    trainer = DPOTrainer(model=policy, ref_model=surgery.hf.reference(policy), args=args,
                         train_dataset=preferences(), processing_class=tokenizer())
    data = trainer.train_dataset
    batch = trainer.data_collator([data[i] for i in range(len(data))])
    base = LLAMA.model()
    add_fused_lm_head(base)
    with torch.no_grad():
        chosen, rejected = trainer.compute_ref_log_probs(base, batch)
        on, _ = trainer.compute_ref_log_probs(policy, batch)
    assert torch.equal(torch.tensor(data["ref_chosen_logps"]), chosen)
    assert torch.equal(torch.tensor(data["ref_rejected_logps"]), rejected)
    assert not torch.equal(on, chosen)
