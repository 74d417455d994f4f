"""DPO with one model: the reference log-probs come from the same model under `surgery.disabled`.

A small GPT-2 gets LoRA on its attention; each step scores a chosen and a rejected continuation of
a prompt under the policy (adapters on) and under the reference (adapters off, no gradient), and
takes a step on the DPO loss (Rafailov et al. 2023, arXiv 2305.18290):

    loss = -log sigmoid(beta * ((pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)))

No second copy of the model is kept: `surgery.disabled(model)` swaps the original layers in for
the length of the block, so the reference is the base model bit for bit at every step.

    python examples/dpo_without_a_second_model.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

import surgery
from adapters import LoRA

BETA = 0.5


def sequence_logprob(model, prompt: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """log p(answer | prompt) summed over the answer's tokens, per row: (batch,)."""
    ids = torch.cat([prompt, answer], dim=1)
    logits = model(input_ids=ids).logits[:, prompt.shape[1] - 1 : -1]  # the positions that predict the answer
    return torch.log_softmax(logits.float(), -1).gather(-1, answer.unsqueeze(-1)).squeeze(-1).sum(-1)


def main(steps: int = 30) -> dict[str, float]:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=64, vocab_size=128, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).eval()  # eval: no dropout, so the reference is deterministic
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 128, (8, 6), generator=g)
    chosen, rejected = torch.randint(0, 128, (8, 4), generator=g), torch.randint(0, 128, (8, 4), generator=g)
    with torch.no_grad():
        base = sequence_logprob(model, prompt, chosen), sequence_logprob(model, prompt, rejected)

    surgery.rewrite(model, LoRA(r=8, alpha=16), "*.c_attn")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(steps):
        with torch.no_grad(), surgery.disabled(model):
            ref_c, ref_r = sequence_logprob(model, prompt, chosen), sequence_logprob(model, prompt, rejected)
        pi_c, pi_r = sequence_logprob(model, prompt, chosen), sequence_logprob(model, prompt, rejected)
        loss = -F.logsigmoid(BETA * ((pi_c - ref_c) - (pi_r - ref_r))).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        # the reference never drifts: it is the base model, whatever the adapter learned
        assert torch.equal(ref_c, base[0]) and torch.equal(ref_r, base[1])

    with torch.no_grad():
        margin = (sequence_logprob(model, prompt, chosen) - sequence_logprob(model, prompt, rejected)).mean().item()
    base_margin = (base[0] - base[1]).mean().item()
    print(f"DPO loss {losses[0]:.4f} -> {losses[-1]:.4f} over {steps} steps; "
          f"mean log-prob margin chosen - rejected {base_margin:+.3f} (base) -> {margin:+.3f} (policy)")
    print(f"one model in memory: {sum(p.numel() for p in params):,} trainable adapter parameters, "
          f"{sum(p.numel() for p in model.parameters()):,} in all; the reference came from surgery.disabled")
    return {"first_loss": losses[0], "last_loss": losses[-1], "base_margin": base_margin, "margin": margin}


if __name__ == "__main__":
    main()
