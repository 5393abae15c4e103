"""Multi-process training on accelerate: which Accelerator to build, full state on rank 0, clean teardown.

The training loop in train.py is the same for one process, DDP, FSDP and DeepSpeed; this module holds the few places
where they differ. See docs/distributed.md for how to launch and what happens to the teacher, the loss normalisation
and the checkpoints.

- `make_accelerator` builds the Accelerator and refuses a launch that would silently train N independent copies.
  accelerate 1.15 only initialises gloo on a machine without a GPU when told it runs on CPU (`ACCELERATE_USE_CPU`, set
  by `accelerate launch --cpu`); under plain `torchrun` on such a machine every rank would otherwise believe it is
  process 0 of 1 and all ranks would write the same run directory. kdforge passes `cpu=True` itself when WORLD_SIZE > 1
  and there is no accelerator device.
- FSDP in accelerate 1.15 is only switched on for GPU-like devices: with an FSDP config on a CPU-only machine accelerate
  falls back to plain DDP (every rank holds the whole student). kdforge logs a warning then. The FSDP code paths here
  (full state dict gathered to rank 0, optimizer state by parameter name) are exercised on CPU by
  tests/test_distributed.py, which switches accelerate's state to FSDP2 before training (torch's `fully_shard`
  itself works on CPU with gloo).
- Checkpoints are always full (unsharded) and written by rank 0 only: the student as a `save_pretrained` folder, the
  trainable extras, and the optimizer state keyed by parameter name (`torch.distributed.checkpoint.state_dict`), so a
  run can resume under another world size or another strategy. Every rank then loads the same files.
- `BatchLayout` keeps a run's global batch and data order when it resumes under another world size: the checkpoint
  records them, and `batch_layout` re-derives the per-rank batch and gradient accumulation for the new world size (or
  refuses when the global batch cannot be split evenly).
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import KDForgeError

log = logging.getLogger("kdforge")


@dataclass(frozen=True)
class BatchLayout:
    """How one optimizer step reads its global batch, and how this launch splits it over ranks and micro-batches.

    The data order is fixed when a run starts and never depends on the world size: step s reads the global
    micro-batches s*A .. s*A+A-1 (A = global_batch / order_micro_batch) of `order_micro_batch` blocks each from the
    seeded per-epoch permutation (`data/packing.py: batch_indices`), `global_batch` blocks in all. This launch
    splits those blocks, in that order, into `grad_accum` micro-batches of `batch_size` blocks per rank.
    """

    global_batch: int  # blocks per optimizer step, all ranks and micro-batches together
    order_micro_batch: int  # blocks per global micro-batch when the run started (batch_size x world size then)
    world_size: int
    batch_size: int  # blocks per rank and micro-batch in this launch
    grad_accum: int  # micro-batches per step in this launch

    def step_indices(self, n_blocks: int, step: int, seed: int, rank: int) -> list[torch.Tensor]:
        """The block indices of this rank's micro-batches at `step`."""
        from .data.packing import batch_indices

        accum = self.global_batch // self.order_micro_batch
        order = torch.cat([batch_indices(n_blocks, self.order_micro_batch, step * accum + j, seed)
                           for j in range(accum)])
        per_micro = self.batch_size * self.world_size
        return [order[j * per_micro + rank * self.batch_size: j * per_micro + (rank + 1) * self.batch_size]
                for j in range(self.grad_accum)]


def batch_layout(batch_size: int, grad_accum: int, world: int, saved: dict | None = None, *,
                 deepspeed: bool = False) -> BatchLayout:
    """The layout for this launch: the recipe's (`batch_size` per rank, `grad_accum`) on a new run, or, on resume,
    the checkpoint's global batch and data order with a per-rank batch and accumulation re-derived for `world`.

    Re-derived: the largest per-rank batch up to `batch_size` that divides global_batch / world, and the
    accumulation that makes up the rest. Refuses when the global batch does not split evenly over `world` ranks.
    """
    if saved is None:
        return BatchLayout(batch_size * grad_accum * world, batch_size * world, world, batch_size, grad_accum)
    total, old_world = int(saved["global_batch"]), int(saved["world_size"])
    if total % world:
        raise KDForgeError(
            f"this run was checkpointed with {old_world} process(es) and a global batch of {total} blocks, which "
            f"{world} processes cannot split evenly (the run would change); resume with a number of processes that "
            f"divides {total} (for example {old_world} again), or start a new run in another --out")
    per_rank = total // world
    batch = max(b for b in range(1, min(batch_size, per_rank) + 1) if per_rank % b == 0)
    if deepspeed and (batch, per_rank // batch) != (batch_size, grad_accum):
        raise KDForgeError(
            f"this run was checkpointed with {old_world} process(es); under DeepSpeed kdforge cannot re-derive the "
            f"batch for {world} processes (its config fixes the micro-batch); resume with {old_world} processes, "
            "or without DeepSpeed")
    return BatchLayout(total, int(saved["order_micro_batch"]), world, batch, per_rank // batch)


def _has_accelerator_device() -> bool:
    accel = getattr(torch, "accelerator", None)
    if accel is not None and hasattr(accel, "is_available"):
        return bool(accel.is_available())
    return torch.cuda.is_available()


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


_WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launched_world_size() -> int | None:
    """The number of processes the launcher (torchrun, accelerate launch, mpirun) started, if it says."""
    for name in _WORLD_SIZE_VARS:
        if os.environ.get(name):
            return int(os.environ[name])
    return None


def make_accelerator(recipe=None, out=None):
    """The Accelerator for a training run, checked against how the processes were launched. With `out` (the run
    folder), it carries the accelerate trackers of `recipe.train.log_with` (kdforge.tracking), logging under
    out/logs."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, DistributedType, ProjectConfiguration

    world = launched_world_size()
    deepspeed = _env_flag("ACCELERATE_USE_DEEPSPEED")
    cpu = (world or 1) > 1 and not _has_accelerator_device() and not deepspeed
    handlers = []
    if recipe is not None and any(t.start_step > 0 or t.end_step is not None for t in recipe.objective):
        # A term outside its [start_step, end_step) window leaves its projector without a gradient; DDP must know.
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    tracking: dict = {}
    if recipe is not None and out is not None:
        from .tracking import accelerate_trackers

        trackers = accelerate_trackers(recipe.train.log_with)
        if trackers:
            tracking = {"log_with": trackers, "project_config": ProjectConfiguration(
                project_dir=str(out), logging_dir=str(os.path.join(out, "logs")))}
    accelerator = Accelerator(cpu=True, kwargs_handlers=handlers, **tracking) if cpu else \
        Accelerator(kwargs_handlers=handlers, **tracking)
    if world is not None and accelerator.num_processes != world:
        why = ("accelerate 1.15 cannot run DeepSpeed without a GPU (it records one process per rank); use DDP "
               "(examples/accelerate/ddp.yaml) on CPU" if deepspeed and not _has_accelerator_device()
               else "check the accelerate config and the launcher")
        raise KDForgeError(
            f"launched {world} processes but accelerate set up {accelerator.num_processes} "
            f"({accelerator.distributed_type}), so every rank would train alone; {why}"
        )
    if _env_flag("ACCELERATE_USE_FSDP") and accelerator.distributed_type != DistributedType.FSDP:
        if accelerator.is_main_process:
            log.warning("FSDP was requested, but accelerate %s enables it only on GPUs/accelerators; this run uses "
                        "%s (each rank holds the whole student)", _accelerate_version(), accelerator.distributed_type)
    if (recipe is not None and recipe.student.lora is not None
            and accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)):
        raise KDForgeError(f"student.lora is not supported under {accelerator.distributed_type} in kdforge; launch "
                           "with DDP (examples/accelerate/ddp.yaml) or a single process")
    if accelerator.distributed_type == DistributedType.DEEPSPEED and recipe is not None:
        _fill_deepspeed_config(accelerator, recipe)
    return accelerator


def _accelerate_version() -> str:
    import accelerate

    return accelerate.__version__


def _fill_deepspeed_config(accelerator, recipe) -> None:
    """DeepSpeed needs the micro-batch size and clipping in its config; kdforge has no dataloader to infer them from."""
    t = recipe.train
    if t.grad_accum > 1:
        raise KDForgeError("train.grad_accum > 1 is not supported under DeepSpeed in kdforge; raise "
                           "train.batch_size instead, or use DDP/FSDP")
    cfg = accelerator.state.deepspeed_plugin.deepspeed_config
    if cfg.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        cfg["train_micro_batch_size_per_gpu"] = t.batch_size
    if cfg.get("gradient_clipping", "auto") == "auto":
        cfg["gradient_clipping"] = float(t.clip_grad_norm or 0.0)


def is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator is not None and accelerator.distributed_type == DistributedType.FSDP


def is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator is not None and accelerator.distributed_type == DistributedType.DEEPSPEED


@contextmanager
def plain_model_init(accelerator):
    """A context in which models load with whole weights, also under DeepSpeed ZeRO-3.

    accelerate registers its DeepSpeed config with transformers (whatever zero3_init_flag says), so under ZeRO-3
    `from_pretrained`/`from_config` would build partitioned, empty parameters. The frozen teacher never enters the
    DeepSpeed engine and must stay whole; the engine partitions the student at `accelerator.prepare`.
    """
    if not is_deepspeed(accelerator):
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()


def broadcast_object(accelerator, obj: Any) -> Any:
    """`obj` from the main process, on every process (identity in a single process)."""
    if accelerator.num_processes == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    box = [obj]
    broadcast_object_list(box, from_process=0)
    return box[0]


def full_model_state(accelerator, model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The distiller's full state dict (student.* and extras) on the main process, None elsewhere.

    Under FSDP/DeepSpeed ZeRO-3 this gathers the shards: every rank must call it.
    """
    if is_fsdp(accelerator) or is_deepspeed(accelerator):
        state = accelerator.get_state_dict(model)
    else:
        state = accelerator.unwrap_model(model).state_dict() if accelerator.is_main_process else None
    return state if accelerator.is_main_process else None


def full_optimizer_state(accelerator, model: nn.Module, optimizer) -> dict[str, Any] | None:
    """The optimizer state keyed by parameter name, full tensors, on the main process; None elsewhere.

    Collective under FSDP. Not available under DeepSpeed (its ZeRO optimizer keeps flat partitions).
    """
    if is_deepspeed(accelerator):
        return {} if accelerator.is_main_process else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    if not is_fsdp(accelerator) and not accelerator.is_main_process:
        return None
    fsdp = is_fsdp(accelerator)
    state = get_optimizer_state_dict(model, _inner_optimizer(optimizer),
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=fsdp))
    return state if accelerator.is_main_process else None


def load_optimizer_state(accelerator, model: nn.Module, optimizer, state: dict[str, Any]) -> None:
    """Load a checkpoint's optimizer state on every rank (after `accelerator.prepare`; accelerator None: no launch).

    Reads both formats: keyed by parameter name (kdforge saves this) and by position (`optimizer.state_dict()`).
    """
    if is_deepspeed(accelerator) or not state:
        if accelerator is not None and accelerator.is_main_process:
            log.warning("the optimizer state is not restored on resume: checkpoints written under DeepSpeed hold "
                        "the full weights only")
        return
    inner = _inner_optimizer(optimizer)
    if not state.get("state") or isinstance(next(iter(state["state"])), int):
        if is_fsdp(accelerator) and state.get("state"):
            raise KDForgeError("this checkpoint's optimizer state is keyed by position (an older kdforge); it cannot "
                               "be resumed under FSDP; resume it without FSDP once, or start a new run")
        inner.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, inner, state, options=StateDictOptions(full_state_dict=True))


def _inner_optimizer(optimizer):
    while hasattr(optimizer, "optimizer") and not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def plain_student(accelerator, model: nn.Module, student: nn.Module) -> nn.Module | None:
    """A student whose forward needs no other rank, for rank-0 evaluation and export; None on other ranks.

    Without sharding that is the training student itself; under FSDP/ZeRO-3 a fresh copy built from the config and
    loaded with the gathered weights (every rank must call this, as it gathers).
    """
    if not (is_fsdp(accelerator) or is_deepspeed(accelerator)):
        return student if accelerator.is_main_process else None
    state = full_model_state(accelerator, model)
    if not accelerator.is_main_process:
        return None
    if not (hasattr(type(student), "_from_config") and hasattr(student, "config")):
        raise KDForgeError(f"under {accelerator.distributed_type} kdforge rebuilds the student on rank 0 from its "
                           f"config to evaluate and export it; {type(student).__name__} is not a transformers model")
    with plain_model_init(accelerator):  # rank 0 alone: no ZeRO-3 partitioning (it would wait for the other ranks)
        copy_ = type(student)._from_config(student.config)
    weights = {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}
    missing, unexpected = copy_.load_state_dict(weights, strict=False)
    if unexpected or any("lm_head" not in k for k in missing):
        raise KDForgeError(f"gathered student weights do not match its config (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
    copy_.tie_weights()
    return copy_.to(accelerator.device).train(student.training)


def is_main_process() -> bool:
    """Rank 0 of the launch (or a single process), usable before or after the Accelerator exists."""
    return int(os.environ.get("RANK", "0")) == 0


def end_distributed(success: bool = True) -> None:
    """Tear down the process group if one exists: barrier first on success, as gloo aborts on an unsynchronised exit."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if success:
        dist.barrier()
    dist.destroy_process_group()
