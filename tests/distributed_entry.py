"""Entry script for tests/test_distributed.py, run under `torchrun --nproc_per_node=2` (not a test module itself).

    torchrun --nproc_per_node=2 tests/distributed_entry.py RECIPE.yaml [--refuse RECIPE.yaml OUT]
        [--resize RECIPE.yaml REF OUT STEP] [--ddp OUT] [--fsdp OUT] [--fsdp-interrupt-at STEP]
        [--killed OUT --die-at STEP] [--gradcheck RECIPE.yaml PREFIX]

Jobs run in this order in the same processes (one launch: interpreter start-up dominates on 2 CPU cores):

--refuse RECIPE OUT  resume OUT (a one-process run of RECIPE whose global batch 2 ranks cannot split) with 2 ranks;
                every rank must refuse with a KDForgeError, whose message it writes to OUT.refused.rank<r>.txt.
--resize RECIPE REF OUT STEP  train RECIPE uninterrupted into REF, then into OUT stopped on every rank when step
                STEP starts (KeyboardInterrupt); the test resumes OUT with one process. Each rank writes the block
                indices of every micro-batch it trains on to <REF|OUT>.blocks.rank<r>.jsonl.

--ddp OUT       train RECIPE with DDP (gloo) into OUT.
--fsdp OUT      switch accelerate's state to FSDP2, then train RECIPE into OUT. accelerate 1.15 turns FSDP on only for
                GPU-like devices (on a CPU-only machine an FSDP config silently means DDP), while torch's
                `fully_shard` works on CPU with gloo; the switch lets kdforge's FSDP paths (sharded prepare,
                gathered checkpoints, optimizer state by parameter name, rank-0 export) run here.
--fsdp-interrupt-at S  in the FSDP job, every rank raises KeyboardInterrupt at step S (the job stops at the same
                point on all ranks), then train() is called again in the same processes: a resume under FSDP.
--deepspeed OUT  (launch with `accelerate launch --config_file examples/accelerate/deepspeed_zero3.yaml`) train RECIPE
                under DeepSpeed into OUT. accelerate 1.15 initialises DeepSpeed on a CPU-only machine but records
                num_processes=1 on every rank (its backend stays None without a GPU); this fixes the counts first.
--killed OUT --die-at S  back on DDP, train RECIPE into OUT; rank 1 SIGKILLs itself when step S starts: a real crash
                of one rank (torchrun then stops the other, the launch fails). Always the last job.
--gradcheck RECIPE PREFIX  before each job: uneven valid-token counts per rank, one backward through the prepared
                (DDP/FSDP) model with num_tokens = global count / world (as train.py does), compared per parameter
                with one process on the whole batch; relative errors to PREFIX.ddp.json / PREFIX.fsdp.json.

Rank 0 also appends to OUT.prepared.jsonl what accelerator.prepare made of each model (class, sharded parameters).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import torch
import torch.distributed as dist

torch.set_num_threads(1)


def switch_to_fsdp2() -> None:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    Accelerator(cpu=True)  # initialises gloo and accelerate's shared state (as MULTI_CPU) if not done yet
    # AcceleratorState copies PartialState's shared dict on every construction, so switch both.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    state = AcceleratorState()
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True,
        state_dict_type="FULL_STATE_DICT")


def fix_deepspeed_cpu_state() -> None:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    Accelerator()  # initialises deepspeed.comm (gloo on CPU)
    ranks = {"num_processes": dist.get_world_size(), "process_index": dist.get_rank(),
             "local_process_index": int(os.environ["LOCAL_RANK"])}
    PartialState._shared_state.update(ranks)
    AcceleratorState._shared_state.update(ranks)


def switch_to_ddp() -> None:
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    PartialState._shared_state["distributed_type"] = DistributedType.MULTI_CPU
    state = AcceleratorState()
    state.distributed_type = DistributedType.MULTI_CPU
    state.fsdp_plugin = None


def record_prepared_models(path: str) -> None:
    """Append, on rank 0, what accelerator.prepare made of each model: its class and how many parameters are shards."""
    from accelerate import Accelerator

    original = getattr(Accelerator.prepare, "__wrapped_prepare__", Accelerator.prepare)

    def prepare(self, *objects, **kw):
        result = original(self, *objects, **kw)
        if self.is_main_process:
            model = result[0] if isinstance(result, (tuple, list)) else result
            params = list(model.parameters())
            with open(path, "a") as f:
                f.write(json.dumps({"class": type(model).__name__, "params": len(params),
                                    "dtensor_params": sum(hasattr(p, "full_tensor") for p in params),
                                    "distributed_type": str(self.distributed_type)}) + "\n")
        return result

    prepare.__wrapped_prepare__ = original
    Accelerator.prepare = prepare


def gradcheck(recipe_path: str, result_path: str) -> None:
    """Uneven valid-token counts per rank: the train.py normalisation must give the one-process gradient."""
    from kdforge.batches import shifted_targets
    from kdforge.distributed import make_accelerator
    from kdforge.recipe import load_recipe
    from kdforge.train import prepare

    recipe = load_recipe(recipe_path)
    accelerator = make_accelerator(recipe)
    rank, world = accelerator.process_index, accelerator.num_processes
    setup = prepare(recipe)
    reference = prepare(recipe).distiller  # the same seeded weights: one process, the whole batch
    ids = setup.train_blocks.ids[: 2 * world]
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0  # rank 0 keeps far fewer valid targets than rank 1
    mask[1, 20:] = 0
    big = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    reference(big)[0].backward()
    ref = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}

    optimizer = torch.optim.SGD(setup.distiller.parameters(), lr=0.0)
    model, optimizer = accelerator.prepare(setup.distiller, optimizer)
    local = {k: v[2 * rank: 2 * rank + 2] for k, v in big.items()}
    n_local = shifted_targets(local)[1].sum()
    count = accelerator.reduce(n_local.float(), reduction="sum")  # what train.py does
    loss, _ = model(local, num_tokens=count / world)
    accelerator.backward(loss)
    errors, sharded = {}, 0
    for name, p in model.named_parameters():
        key = name.removeprefix("module.")
        grad = p.grad
        if hasattr(grad, "full_tensor"):  # an FSDP2 shard
            sharded += 1
            grad = grad.full_tensor()
        errors[key] = float((grad - ref[key]).abs().max() / ref[key].abs().max().clamp_min(1e-12))
    counts = accelerator.gather(n_local.reshape(1)).tolist()
    if rank == 0:
        with open(result_path, "w") as f:
            json.dump({"errors": errors, "sharded_params": sharded, "local_counts": counts,
                       "distributed_type": str(accelerator.distributed_type)}, f)
    accelerator.free_memory()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe")
    ap.add_argument("--refuse", nargs=2, metavar=("RECIPE", "OUT"))
    ap.add_argument("--resize", nargs=4, metavar=("RECIPE", "REF", "OUT", "STEP"))
    ap.add_argument("--ddp")
    ap.add_argument("--fsdp")
    ap.add_argument("--fsdp-interrupt-at", type=int)
    ap.add_argument("--deepspeed")
    ap.add_argument("--killed")
    ap.add_argument("--die-at", type=int)
    ap.add_argument("--gradcheck", nargs=2, metavar=("RECIPE", "PREFIX"))
    args = ap.parse_args()

    from kdforge.distiller import Distiller
    from kdforge.distributed import end_distributed
    from kdforge.errors import KDForgeError
    from kdforge.recipe import load_recipe
    from kdforge.train import train

    recipe = load_recipe(args.recipe)
    rank = int(os.environ["RANK"])
    blocks_log: list[str | None] = [None]  # where forward records its batch's block indices (None: nowhere)
    plain_forward = Distiller.forward

    def recording_forward(self, batch, **kw):
        if blocks_log[0] is not None:
            with open(blocks_log[0], "a") as f:
                f.write(json.dumps({"step": kw.get("step"), "blocks": batch["block_index"].tolist()}) + "\n")
        return plain_forward(self, batch, **kw)

    Distiller.forward = recording_forward
    original = Distiller.forward

    def stop_at(step: int | None, how):
        def forward(self, batch, **kw):
            if kw.get("step") == step:
                how()
            return original(self, batch, **kw)
        return forward

    def interrupt():
        raise KeyboardInterrupt

    if args.refuse:
        try:
            train(load_recipe(args.refuse[0]), progress=False, out=args.refuse[1])
            message = "no error"
        except KDForgeError as err:
            message = str(err)
        with open(f"{args.refuse[1]}.refused.rank{rank}.txt", "w") as f:
            f.write(message)
    if args.resize:
        resize_recipe, ref, stopped, stop = load_recipe(args.resize[0]), *args.resize[1:]
        blocks_log[0] = f"{ref}.blocks.rank{rank}.jsonl"
        train(resize_recipe, progress=False, out=ref)
        blocks_log[0] = f"{stopped}.blocks.rank{rank}.jsonl"
        Distiller.forward = stop_at(int(stop), interrupt)
        try:
            train(resize_recipe, progress=False, out=stopped)
        except KeyboardInterrupt:
            dist.barrier()
        Distiller.forward = original
        blocks_log[0] = None
    if args.ddp:
        record_prepared_models(args.ddp + ".prepared.jsonl")
        if args.gradcheck:
            gradcheck(args.gradcheck[0], args.gradcheck[1] + ".ddp.json")
        train(recipe, progress=False, out=args.ddp)
    if args.fsdp:
        switch_to_fsdp2()
        record_prepared_models(args.fsdp + ".prepared.jsonl")
        if args.gradcheck:
            gradcheck(args.gradcheck[0], args.gradcheck[1] + ".fsdp.json")
        Distiller.forward = stop_at(args.fsdp_interrupt_at, interrupt)
        try:
            train(recipe, progress=False, out=args.fsdp)
        except KeyboardInterrupt:
            Distiller.forward = original
            dist.barrier()
            train(recipe, progress=False, out=args.fsdp)  # resumes from the last checkpoint
        Distiller.forward = original
        switch_to_ddp()
    if args.deepspeed:
        fix_deepspeed_cpu_state()
        train(recipe, progress=False, out=args.deepspeed)
    if args.killed:
        record_prepared_models(args.killed + ".prepared.jsonl")
        if rank == 1:
            Distiller.forward = stop_at(args.die_at, lambda: os.kill(os.getpid(), signal.SIGKILL))
        train(recipe, progress=False, out=args.killed)
        raise SystemExit("--die-at did not stop the run")
    end_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
