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
from adapters import LoRA, PiSSA
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
    pissa = toy()  # its A and B come from an SVD: fully_shard refused them while they were strided
    surgery.rewrite(pissa, PiSSA(r=2), "*")
    result["pissa_shard"] = outcome(lambda: [fully_shard(s) for s in surgery.sites(pissa).values()])
    sharded_base = toy()
    fully_shard(sharded_base)
    result["rewrite_sharded"] = outcome(lambda: surgery.rewrite(sharded_base, LoRA(r=2), "*"))
    bare = toy()
    surgery.load(bare, f"{out}/a.safetensors")
    with torch.no_grad():
        result["reload_max_diff"] = (bare(probe) - y).abs().max().item()
    result["trained"] = any(s.lora_B.abs().sum().item() > 0 for s in surgery.sites(bare).values())
    result.update(ddp(out, rank))
    for r in range(dist.get_world_size()):  # one rank at a time, so the two JSON lines never interleave
        if r == rank:
            print(json.dumps(result), flush=True)
        dist.barrier()
    dist.destroy_process_group()


def spread(t: torch.Tensor) -> float:
    """The largest difference between this tensor on any two ranks (0 when every rank holds the same)."""
    hi, lo = t.detach().clone(), t.detach().clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return (hi - lo).abs().max().item()


def ddp(out: str, rank: int) -> dict:
    """DDP around a rewritten model: each rank trains on its own batch, the adapters stay equal across ranks,
    and a file saved through the wrapper (rank 0) loads on a bare base with the wrapped model's outputs."""
    model = toy()
    surgery.rewrite(model, LoRA(r=4), "*")
    wrapped = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=0.5)
    for step in range(2):
        x = torch.randn(4, 16, generator=torch.Generator().manual_seed(10 * rank + step))
        opt.zero_grad()
        wrapped(x).square().mean().backward()
        opt.step()
    tensors = torch.cat([t.flatten() for s in surgery.sites(wrapped).values() for t in s.adapter_tensors().values()])
    if rank == 0:
        surgery.save(wrapped, f"{out}/ddp.safetensors")
    dist.barrier()
    probe = torch.randn(3, 16, generator=torch.Generator().manual_seed(9))
    bare = toy()
    surgery.load(bare, f"{out}/ddp.safetensors")
    with torch.no_grad():
        diff = (bare(probe) - wrapped(probe)).abs().max().item()
    del wrapped, opt  # DDP's reducer threads must be gone before the process group is
    gc.collect()
    dist.barrier()
    return {"ddp_spread": spread(tensors), "ddp_moved": tensors.abs().max().item() > 0, "ddp_reload_max_diff": diff}


if __name__ == "__main__":
    main(sys.argv[1])
