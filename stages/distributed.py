"""Several processes for the train stage's hf backend (train.devices, train.sharding).

When more than one process is asked for, the train stage starts itself again under torchrun
(torch.distributed.run); each process then trains on its share of every step's conversations:
  ddp    - torch DistributedDataParallel: every process holds the whole model, LoRA grads all-reduced
  fsdp2  - torch's fully_shard per decoder layer (and the rest as the root): weights, grads and
           optimizer state sharded across processes, gathered layer by layer
  zero2  - DeepSpeed ZeRO stage 2: optimizer state and grads sharded (weights whole)
  zero3  - DeepSpeed ZeRO stage 3: weights sharded too
The global step is the one-process step: a step's conversations are split between the processes
(balanced by tokens), and each process's loss is weighted by its share of the step's labelled
tokens, so the averaged gradients, and the logged loss, are those of the one-process step.
Only rank 0 writes outs and metrics. On a CPU (train.device: cpu) the processes talk over gloo.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

from stages.chat_template import IGNORE
from stages.common import StageError

SHARDINGS = ("none", "ddp", "fsdp2", "zero2", "zero3")


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def process_count(devices, sharding: str, device: str) -> int:
    """How many processes train.devices asks for: auto is every visible GPU when a sharding is
    set (one process on a CPU, or with sharding none)."""
    if devices != "auto":
        return int(devices)
    if sharding == "none" or device == "cpu":
        return 1
    return max(visible_gpus(), 1)


def launched() -> bool:
    """True inside a process that torchrun started."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def torchrun_command(nproc: int, module: str, argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", module, *argv]


def one_thread_each(env: dict) -> dict:
    """env for processes that share the CPU: one thread each unless OMP_NUM_THREADS says otherwise
    (torchrun's own default), MKL's pool the same size (stages.common's CPU pin had sized it for
    one process; a larger MKL pool than OpenMP's made the steps 40x slower here)."""
    if "OMP_NUM_THREADS" not in env:
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def relaunch(nproc: int, module: str, argv: list[str]) -> int:
    """Run `python -m module argv` as nproc processes under torchrun; its exit status."""
    env = one_thread_each(dict(os.environ))
    print(f"train: {nproc} processes under torchrun", flush=True)
    return subprocess.run(torchrun_command(nproc, module, argv), env=env).returncode


@dataclass
class Group:
    rank: int
    world: int
    device: "torch.device"
    sharding: str

    @property
    def main(self) -> bool:
        return self.rank == 0


def join(sharding: str, device_kind: str) -> Group:
    """Join the process group torchrun set up (nccl on GPUs, gloo on a CPU)."""
    import torch
    import torch.distributed as dist

    local = int(os.environ["LOCAL_RANK"])
    if device_kind == "cpu" or not torch.cuda.is_available():
        device, backend = torch.device("cpu"), "gloo"
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    else:
        device, backend = torch.device("cuda", local), "nccl"
        torch.cuda.set_device(device)
    dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
    return Group(dist.get_rank(), dist.get_world_size(), device, sharding)


def leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def labelled(example: dict) -> int:
    """Tokens of a conversation that the loss counts (targets after the first token)."""
    return sum(t != IGNORE for t in example["labels"][1:])


def shard(indices: list[int], examples: list[dict], rank: int, world: int) -> list[int]:
    """This rank's conversations of one step: longest first, each to the rank with the fewest
    tokens so far (ties to the lowest rank), the same answer on every rank."""
    loads, owner = [0] * world, {}
    for i in sorted(indices, key=lambda i: (-len(examples[i]["input_ids"]), i)):
        r = loads.index(min(loads))
        owner[i] = r
        loads[r] += len(examples[i]["input_ids"])
    return [i for i in indices if owner[i] == rank]


def local_step(indices: list[int], examples: list[dict], group: Group) -> tuple[list[dict], float]:
    """This rank's conversations of a step and the weight of its mean loss, so that the average
    over ranks of weight x mean is the step's mean over all its labelled tokens. A rank left
    without a conversation runs one with weight 0 (every rank must run the collective backward)."""
    mine = shard(indices, examples, group.rank, group.world)
    total = max(sum(labelled(examples[i]) for i in indices), 1)
    if not mine:
        return [examples[indices[0]]], 0.0
    return [examples[i] for i in mine], sum(labelled(examples[i]) for i in mine) * group.world / total


def mean_over_ranks(value: "torch.Tensor") -> float:
    import torch.distributed as dist

    value = value.detach().clone()
    dist.all_reduce(value)
    return value.item() / dist.get_world_size()


def step_loss_module(model, loss_fn):
    """One module whose forward is a step's weighted loss, so that DDP, FSDP2's root and DeepSpeed
    see every forward (the chunked loss calls the decoder and lm_head weight directly)."""
    import torch

    class StepLoss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, batch: dict, weight: float):
            return loss_fn(self.model, batch) * weight

    return StepLoss()


def deepspeed_config(stage: int) -> dict:
    """ZeRO config for our own loop: one micro-batch a step (the step's batch is ours), the client
    AdamW kept (hence allow_untested), no loss scaling (bf16 autocast or fp32)."""
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
            "gradient_clipping": 0.0, "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False}


class Sharded:
    """The train stage's model wrapped as group.sharding says: step(), loss() and adapter_state()."""

    def __init__(self, model, loss_fn, group: Group, make_optimizer, make_scheduler, bf16: bool):
        import torch

        self.model, self.group = model, group
        wrapped = step_loss_module(model, loss_fn)
        if group.sharding == "ddp":
            ids = [group.device.index] if group.device.type == "cuda" else None
            self.engine = torch.nn.parallel.DistributedDataParallel(wrapped, device_ids=ids)
        elif group.sharding == "fsdp2":
            self.engine = fsdp2(wrapped, model, group, bf16)
        if group.sharding in ("ddp", "fsdp2"):
            self.optimizer = make_optimizer(model)  # after fully_shard: its parameters are the sharded ones
            self.scheduler = make_scheduler(self.optimizer)
        else:
            import deepspeed

            optimizer = make_optimizer(model)
            self.scheduler = make_scheduler(optimizer)
            self.engine, self.optimizer, _, _ = deepspeed.initialize(
                model=wrapped, optimizer=optimizer, lr_scheduler=self.scheduler,
                config=deepspeed_config(int(group.sharding[-1])))

    def step(self, batch: dict, weight: float) -> "torch.Tensor":
        """One optimizer (and scheduler) step; this rank's weighted loss, detached."""
        loss = self.engine(batch, weight)
        if self.group.sharding.startswith("zero"):
            self.engine.backward(loss)
            self.engine.step()  # optimizer, scheduler, zero_grad
        else:
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
        return loss.detach()

    def loss(self, batch: dict) -> "torch.Tensor":
        return self.engine(batch, 1.0)

    def adapter_state(self) -> dict | None:
        """The LoRA weights whole, on the CPU (collective: every rank calls it); None where the
        model's own parameters are whole already (ddp, zero2)."""
        trainable = [(n, q) for n, q in self.model.named_parameters() if q.requires_grad]
        if self.group.sharding == "fsdp2":
            return {n: q.full_tensor().detach().cpu() for n, q in trainable}
        if self.group.sharding == "zero3":
            import deepspeed

            with deepspeed.zero.GatheredParameters([q for _, q in trainable], modifier_rank=None):
                return {n: q.detach().cpu().clone() for n, q in trainable}
        return None


def fsdp2(wrapped, model, group: Group, bf16: bool):
    """fully_shard each decoder layer, then the step-loss module as the root (embeddings, norm,
    lm_head). A bf16 base with fp32 LoRA weights is gathered in bf16 (FSDP2 gathers one dtype a
    layer; the LoRA matmuls run in bf16 under autocast anyway) and its grads reduced in fp32."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(group.device.type, (group.world,))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
              else MixedPrecisionPolicy())
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for layer in base.get_decoder().layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    return fully_shard(wrapped, mesh=mesh, mp_policy=policy)


def check_sharding(sharding: str) -> None:
    if sharding.startswith("zero"):
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise StageError(f"train.sharding: {sharding} needs deepspeed in this environment "
                             "(envs/core.txt pins it; rerun ./setup.sh)") from None
