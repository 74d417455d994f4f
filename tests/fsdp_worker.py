"""Run by tests/test_fsdp.py under `torchrun --nproc_per_node=2` (gloo, CPU): FSDP2 on a rewritten model.

Each rank prints one JSON line: what each verb did on the sharded model, and (rank 0) how a file
saved from it loads on a bare base.
"""

import gc
import json
import sys
import weakref

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

import surgery
from adapters import LoRA
from surgery import errors as E


def toy() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))


def outcome(call) -> str:
    try:
        call()
        return "ran"
    except E.SurgeryError as e:
        return type(e).__name__


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = toy()
    surgery.rewrite(model, LoRA(r=4), "*")
    whole = [weakref.ref(site.weight) for site in surgery.sites(model).values()]
    for site in surgery.sites(model).values():
        fully_shard(site)
    fully_shard(model)
    gc.collect()
    kept_whole = sum(ref() is not None for ref in whole)  # the site's original leaf must not hold them
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(rank))  # each rank its own batch
    model(x).square().mean().backward()
    opt.step()
    probe = torch.randn(3, 16, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        y = model(probe)
    surgery.save(model, f"{out}/a.safetensors")  # every rank calls it; rank 0 writes
    result = {
        "rank": rank,
        "kept_whole_weights": kept_whole,
        "merge": outcome(lambda: surgery.merge(model)),
        "export": outcome(lambda: surgery.export_peft(model, f"{out}/peft")),
        "disabled": outcome(lambda: surgery.disabled(model).__enter__()),
    }
    sharded_base = toy()
    fully_shard(sharded_base)
    result["rewrite_sharded"] = outcome(lambda: surgery.rewrite(sharded_base, LoRA(r=2), "*"))
    bare = toy()
    surgery.load(bare, f"{out}/a.safetensors")
    with torch.no_grad():
        result["reload_max_diff"] = (bare(probe) - y).abs().max().item()
    result["trained"] = any(s.lora_B.abs().sum().item() > 0 for s in surgery.sites(bare).values())
    print(json.dumps(result), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
