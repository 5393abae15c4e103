"""The training loop, top to bottom: build everything from a recipe, train on accelerate, checkpoint, resume exactly.

A run directory holds: manifest.json (resolved recipe, hash, seed, versions, commit, hardware), metrics.jsonl (one
row per logged step / eval), checkpoints/step_XXXXXXXX/ (student, trainable extras, optimizer, scheduler, RNG), and
student/ (the final student, loadable with plain transformers; with student.lora the adapter merged in, and the
adapter alone in student_adapter/) plus final.json (held-out metrics), .kdforge.lock (the run lock) and, while a run
is on, .kdforge.holder.json (kdforge.rundir). With train.log_with: metrics.csv and the trackers' files under logs/
(kdforge.tracking). Checkpoint I/O: kdforge.checkpoints.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Sequence

import torch

from .data.corpus_blocks import tokenize_corpus  # noqa: F401 - kdforge.train.tokenize_corpus, as before
from .batches import shifted_targets
from .distiller import Distiller
from .distributed import (BatchLayout, batch_layout, broadcast_object, full_model_state, full_optimizer_state,
                          is_deepspeed, load_optimizer_state, make_accelerator, plain_model_init, plain_student)
from .errors import KDForgeError
from .checkpoints import (DamagedCheckpoint, apply_checkpoint, checkpoint_dirs, newest_intact, nonfinite,
                          read_checkpoint, save_checkpoint, step_of)
from .checkpoints import rewind
from .interrupts import StopRequested, StopSignals
from .io import atomic_write_json, atomic_write_text, disk_full_as_error, remove_temporaries
from .precision import manifest_entry as precision_entry
from .progress import Progress
from .recipe import Recipe
from .rundir import RunLock, check_manifest, make_output_dir, read_manifest, set_aside
from .tracking import MetricsLog
from .tasks import task_for
from .tasks.base import Setup
from .tasks.causal_lm import data_fingerprint, model_card  # noqa: F401 - their former home

__all__ = ["Setup", "prepare", "train", "finish", "tokenize_corpus", "data_fingerprint", "model_card", "manifest",
           "lr_lambda", "stage_boundaries", "param_groups", "load_checkpoint"]

log = logging.getLogger("kdforge")


def prepare(recipe: Recipe, teacher=None, tokenizer=None, blocks: tuple | None = None) -> Setup:
    """Load teacher, student and data as the recipe's task says (kdforge.tasks). A preloaded teacher/tokenizer and
    the task's (train, held-out) data (for causal_lm: the blocks `tokenize_corpus` made with that tokenizer) may be
    passed in."""
    return task_for(recipe).prepare(recipe, teacher=teacher, tokenizer=tokenizer, blocks=blocks)


def manifest(recipe: Recipe, world_size: int = 1, fingerprint: str | None = None) -> dict[str, Any]:
    import accelerate
    import transformers

    from . import __version__

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "recipe": recipe.model_dump(mode="json"),
        "recipe_hash": recipe.hash(),
        "data_fingerprint": fingerprint,
        "seed": recipe.seed,
        "versions": {"kdforge": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
                     "transformers": transformers.__version__, "accelerate": accelerate.__version__},
        "git_commit": commit,
        "hardware": {"platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count(),
                     "cuda": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                     "world_size": world_size},
        "precision": precision_entry(recipe),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float, boundaries: Sequence[int] = ()) -> float:
    """Linear warm-up, then cosine decay to min_ratio of the peak. With stage `boundaries` (a PWKD teacher
    curriculum's cyclic learning rate) the warm-up + cosine restarts at each boundary and spans that stage."""
    start = max((b for b in boundaries if b <= step), default=0)
    stop = min((b for b in boundaries if b > step), default=total)
    step, total = step - start, stop - start
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def stage_boundaries(recipe: Recipe) -> list[int]:
    """Steps where a teacher-curriculum stage begins and, with `cyclic_lr`, the learning-rate schedule restarts."""
    curriculum = recipe.teacher.curriculum if recipe.teacher is not None else None
    if curriculum is None or not curriculum.cyclic_lr:
        return []
    return list(itertools.accumulate(curriculum.stage_steps(recipe.train.steps)))[:-1]


def param_groups(distiller: Distiller, recipe: Recipe) -> list[dict[str, Any]]:
    """Student weights (decay on matrices only) and, with their own lr, the distillation extras (projectors)."""
    decay, no_decay, extras = [], [], []
    student_ids = {id(p) for p in distiller.student.parameters()}
    for p in {id(p): p for p in distiller.parameters() if p.requires_grad}.values():
        if id(p) not in student_ids:
            extras.append(p)
        elif p.ndim >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    t = recipe.train
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if extras:
        groups.append({"params": extras, "weight_decay": 0.0, "lr": t.projector_lr or t.lr})
    return groups


def load_checkpoint(path: Path, distiller: Distiller, optimizer, scheduler) -> dict[str, Any]:
    """Load weights, scheduler and RNG, and the optimizer unless it is None (train loads that after prepare).
    Returns the trainer state: step, optimizer, scheduler, RNG and (newer checkpoints) the batch layout and the
    run log's cumulative counters. A damaged checkpoint raises KDForgeError naming the bad file."""
    try:
        ckpt = read_checkpoint(path)
    except DamagedCheckpoint as err:
        raise KDForgeError(f"checkpoint {err}; delete {path} to resume from the one before it") from None
    state = apply_checkpoint(ckpt, distiller, scheduler)
    if optimizer is not None:
        load_optimizer_state(None, distiller, optimizer, state["optimizer"])
    return state


def _resume_layout(recipe: Recipe, world: int, state: dict[str, Any] | None, out: Path, *, deepspeed: bool,
                   announce: bool) -> BatchLayout:
    """The batch layout of this launch (see kdforge.distributed.BatchLayout); on resume under another world size,
    re-derived and announced in one line. Checkpoints written before the layout was recorded: the recipe's batch
    at the world size in the manifest (that of the first launch)."""
    t = recipe.train
    if state is None:
        return batch_layout(t.batch_size, t.grad_accum, world)
    saved = state.get("layout")
    if saved is None:
        manifest_path = out / "manifest.json"
        old_world = (json.loads(manifest_path.read_text())["hardware"]["world_size"] if manifest_path.is_file()
                     else world)
        saved = {"global_batch": t.batch_size * t.grad_accum * old_world,
                 "order_micro_batch": t.batch_size * old_world, "world_size": old_world}
    layout = batch_layout(t.batch_size, t.grad_accum, world, saved, deepspeed=deepspeed)
    if announce and (layout.batch_size, layout.grad_accum) != (t.batch_size, t.grad_accum):
        log.info("resuming under %d process(es) a run checkpointed under %d: re-derived per-rank batch %d x "
                 "grad_accum %d (recipe: %d x %d), so the global batch stays %d blocks and each step reads the same "
                 "blocks as before", world, saved["world_size"], layout.batch_size, layout.grad_accum, t.batch_size,
                 t.grad_accum, layout.global_batch)
    return layout


def _rewrite_metrics(path: Path, upto_step: int) -> None:
    """On resume, drop metric rows written after the checkpoint (and a last line cut off by a kill mid-write), so
    the log matches an uninterrupted run. Atomic: the log is replaced whole."""
    if not path.is_file():
        return
    lines = path.read_text().split("\n")
    lines.pop()  # after the last newline: empty, or a row the kill cut off
    keep = []
    for n, line in enumerate(lines, 1):
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            raise KDForgeError(f"{path} line {n} is not a metrics row ({line[:60]!r}); repair or delete that line "
                               "and resume again") from None
        if step <= upto_step:
            keep.append(line + "\n")
    atomic_write_text(path, "".join(keep))


_DISK_HINT = "use an --out on a larger disk"


def train(recipe: Recipe, *, setup: Setup | None = None, progress: bool = True, out: Path | None = None,
          resume_from: str | None = None) -> Path:
    """Run (or resume) the recipe's training and final evaluation. Returns the run directory.

    The main process holds the run folder's lock (kdforge.rundir) from start to end; SIGTERM and SIGINT stop the run
    at a whole step and, in a single-process run, save a checkpoint there (kdforge.interrupts). A finished run whose
    recipe now asks for more `train.steps` is extended from its last checkpoint (the learning-rate schedule then
    spans the new step count). `resume_from` (a checkpoint folder name such as `step_00000040`, or its path) rewinds
    the run to that checkpoint: what came after it is moved into `superseded/`, never deleted."""
    out = Path(out or recipe.output_dir)
    accelerator = make_accelerator(recipe, out)  # DDP / FSDP / DeepSpeed come from the launcher; kdforge.distributed
    lock = RunLock(out) if accelerator.is_main_process else None  # all ranks share the folder: one lock, on rank 0
    error, new_manifest = None, False
    if lock is not None:
        try:
            make_output_dir(out)
            lock.acquire()
            for folder in (out, out / "checkpoints"):  # only kdforge writes here, and no other run does (the lock)
                remove_temporaries(folder)
            if resume_from is not None:
                rewind(out, resume_from)
            new_manifest = check_manifest(out, recipe.hash(), has_checkpoint=bool(checkpoint_dirs(out)))
        except (KDForgeError, OSError) as err:
            error = str(err)
    error = broadcast_object(accelerator, error)  # every rank stops, none waits forever at a barrier
    try:
        if error:
            raise KDForgeError(error)
        # single process only: ranks of a multi-process run keep the default (the launcher stops them together)
        with StopSignals(install=accelerator.num_processes == 1) as signals:
            return _train(recipe, accelerator, out, setup, progress, new_manifest, signals)
    finally:
        if lock is not None:
            lock.release()


def _train(recipe: Recipe, accelerator, out: Path, setup: Setup | None, progress: bool, new_manifest: bool,
           signals: StopSignals) -> Path:
    from accelerate.utils import set_seed

    wall_start = time.time()
    is_main = accelerator.is_main_process
    world = accelerator.num_processes
    if (out / "final.json").is_file():
        finished = int(json.loads((out / "final.json").read_text()).get("step", recipe.train.steps))
        if recipe.train.steps < finished:
            raise KDForgeError(f"{out} finished {finished} steps, so train.steps={recipe.train.steps} cannot shorten "
                               f"it; extend it (train.steps > {finished}), rewind it with --resume-from, or use "
                               "another --out")
        if recipe.train.steps == finished:
            if is_main:
                log.info("%s is already finished; delete it or use another --out to retrain", out)
            return out
        if not checkpoint_dirs(out):
            raise KDForgeError(f"{out} finished {finished} steps without keeping a checkpoint (train.save_every 0?), "
                               "so it cannot be extended; retrain in another --out")
        accelerator.wait_for_everyone()  # every rank has read final.json before rank 0 moves it
        if is_main:
            set_aside(out, [out / "final.json", out / "eval.json"])
            log.info("extending the finished run from %d to %d steps, from its last checkpoint (the learning-rate "
                     "schedule now spans %d steps)", finished, recipe.train.steps, recipe.train.steps)
        new_manifest = True  # it records the new step count
    set_seed(recipe.seed)
    if recipe.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    with plain_model_init(accelerator):  # whole weights even under DeepSpeed ZeRO-3 (the teacher stays outside it)
        setup = setup or prepare(recipe)
    t = recipe.train
    distiller = setup.distiller
    task = setup.task or task_for(recipe)
    if setup.task is None:
        setup = replace(setup, task=task)
    optimizer = torch.optim.AdamW(param_groups(distiller, recipe), lr=t.lr, betas=(0.9, 0.95))
    boundaries = stage_boundaries(recipe)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, t.warmup_steps, t.steps, t.min_lr_ratio, boundaries))
    # every rank reads the same files (the newest intact checkpoint); the optimizer after prepare (FSDP re-creates
    # params)
    ckpt = newest_intact(out, announce=is_main)
    trainer_state = apply_checkpoint(ckpt, distiller, scheduler) if ckpt is not None else None
    start = ckpt.step if ckpt is not None else 0
    if is_main and ckpt is not None:
        log.info("resuming from %s (step %d)", ckpt.path, start)
    layout = _resume_layout(recipe, world, trainer_state, out, deepspeed=is_deepspeed(accelerator), announce=is_main)
    blocks = setup.train_blocks
    # The run log's cumulative counters continue from the checkpoint. Older checkpoints did not record them: every
    # training block is a full packed block, so the tokens seen follow from the step.
    tokens_seen = (0 if trainer_state is None else int(trainer_state["tokens_seen"]) if "tokens_seen" in trainer_state
                   else start * layout.global_batch * (blocks.ids.shape[1] - 1))
    seconds_before = float(trainer_state.get("train_seconds", 0.0)) if trainer_state is not None else 0.0
    metrics_path = out / "metrics.jsonl"
    if is_main and trainer_state is not None and trainer_state.get("steps", t.steps) != t.steps:
        log.warning("this run was checkpointed with train.steps=%d and continues with %d: its learning-rate schedule "
                    "(and any curriculum stages) now span %d steps", trainer_state["steps"], t.steps, t.steps)
    if is_main and ckpt is not None and not new_manifest:
        was = (read_manifest(out) or {}).get("precision") or {}
        now = precision_entry(recipe)
        if {k: was.get(k, now[k]) for k in ("teacher_dtype", "student_bf16")} != \
                {k: now[k] for k in ("teacher_dtype", "student_bf16")}:
            log.warning("this run started with teacher %s / student bf16 %s and resumes with teacher %s / student bf16 "
                        "%s (precision auto resolves by the machine)", was.get("teacher_dtype"),
                        was.get("student_bf16"), now["teacher_dtype"], now["student_bf16"])
    fingerprint = task.fingerprint(blocks, setup.val_blocks)
    changed = None
    if is_main and ckpt is not None:  # also when an extension is about to rewrite the manifest
        recorded = (read_manifest(out) or {}).get("data_fingerprint")
        if recorded is not None and recorded != fingerprint:
            changed = (f"the data of {out} changed since the run started (its token fingerprint was {recorded}, now "
                       f"{fingerprint}): resuming would train on other data; restore the files, or use another --out")
    changed = broadcast_object(accelerator, changed)
    if changed:
        raise KDForgeError(changed)
    metrics = MetricsLog(out, t.log_with, accelerator)  # metrics.jsonl, metrics.csv, trackers (kdforge.tracking)
    if is_main:
        _rewrite_metrics(metrics_path, start)
        metrics.start(recipe, start)
        if new_manifest:
            atomic_write_json(out / "manifest.json", manifest(recipe, world, fingerprint))
    model, optimizer = accelerator.prepare(distiller, optimizer)
    unusable = [p for p in checkpoint_dirs(out) if step_of(p) > start]  # passed over above: damaged
    if unusable:
        accelerator.wait_for_everyone()  # every rank has read its checkpoint
        if is_main:
            for p in unusable:
                shutil.rmtree(p, ignore_errors=True)
            log.info("removed the unusable checkpoint(s) %s", ", ".join(p.name for p in unusable))
    if trainer_state is not None:
        load_optimizer_state(accelerator, model, optimizer, trainer_state["optimizer"])
    from .onpolicy import onpolicy_for  # on-policy KD (recipe `onpolicy:`): None for off-policy recipes

    policy = onpolicy_for(setup, (trainer_state or {}).get("onpolicy"))
    device = accelerator.device
    teacher_model = getattr(distiller.teacher_source, "model", None)
    if teacher_model is not None:  # not a submodule: DDP/FSDP never wrap it, each rank holds a frozen replica
        teacher_model.to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if t.bf16 else nullcontext()
    bar = Progress(recipe.name, t.steps, start=start, enabled=progress and is_main)
    last_good = ckpt.path if ckpt is not None else None  # a checkpoint with finite weights (checked on save/read)
    completed = saved = start  # steps done; the step of the newest checkpoint (or 0)
    step_rng = torch.get_rng_state()  # the RNG state when the next step starts (what a checkpoint must hold)
    t_start = time.perf_counter()

    def save(step: int, state, optimizer_state, rng=None) -> Path:
        counters = {"layout": asdict(layout), "tokens_seen": tokens_seen, "steps": t.steps,
                    "train_seconds": seconds_before + time.perf_counter() - t_start}
        if policy is not None:
            counters["onpolicy"] = policy.state_dict()
        return save_checkpoint(out, step, accelerator.unwrap_model(model), optimizer, scheduler, t.keep_checkpoints,
                               state=state, optimizer_state=optimizer_state, progress=counters, rng=rng)

    model.train()
    try:
        for step in range(start, t.steps):
            micro = [task.make_batch(blocks, index)
                     for index in layout.step_indices(len(blocks), step, recipe.seed, accelerator.process_index)]
            micro = [{k: v.to(device) for k, v in mb.items()} for mb in micro]
            if policy is not None:  # some micro-batches' responses become the student's own (kdforge.onpolicy)
                micro = policy.batches(micro, step, accelerator.process_index)
            local_count = sum(shifted_targets(mb)[1].sum() for mb in micro).float()
            global_count = accelerator.reduce(local_count.clone(), reduction="sum")
            # DDP averages gradients over ranks, so each rank's share is scaled by world size.
            per_rank_norm = global_count / world
            sums: dict[str, torch.Tensor] = {}
            total_loss = torch.zeros((), device=device)
            for j, mb in enumerate(micro):
                sync = accelerator.no_sync(model) if j < len(micro) - 1 else nullcontext()
                with sync:
                    with autocast:
                        loss, values = model(mb, num_tokens=per_rank_norm, step=step)
                    accelerator.backward(loss)
                n = shifted_targets(mb)[1].sum()
                for k, v in values.items():
                    sums[k] = sums.get(k, 0) + v.float() * n
                total_loss += loss.detach()
            total_loss = accelerator.reduce(total_loss, reduction="sum") / world
            if not torch.isfinite(total_loss):
                where = f"last good checkpoint: {last_good}" if last_good else "no checkpoint was written yet"
                raise KDForgeError(
                    f"loss became {float(total_loss)} at step {step}; training stopped ({where}); "
                    "lower train.lr, enable train.clip_grad_norm, or check the data"
                )
            with signals.critical():  # from the weight update to the end of the step: a stop waits for its end
                grad_norm = None
                if t.clip_grad_norm:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), t.clip_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                tokens_seen += int(global_count)
                done = step + 1
                policy_row = policy.after_step(done) if policy is not None else {}
                terms = {k: float(accelerator.reduce(v, reduction="sum") / global_count) for k, v in sums.items()}
                bar.update(done, {"loss": float(total_loss), **terms})
                train_seconds = seconds_before + time.perf_counter() - t_start
                if is_main and (done % t.log_every == 0 or done == t.steps or done == 1):
                    row = {"step": done, "loss": float(total_loss), **{f"loss/{k}": v for k, v in terms.items()},
                           "lr": scheduler.get_last_lr()[0], "tokens": tokens_seen,
                           "tokens_per_s": tokens_seen / train_seconds}  # the only wall-clock field
                    row.update(policy_row)  # on-policy KD: share of generated batches, DistiLLM's threshold
                    if grad_norm is not None:
                        row["grad_norm"] = float(grad_norm)
                    metrics.write(row)
                if t.eval_every and done % t.eval_every == 0 and done != t.steps:
                    eval_student = plain_student(accelerator, model, setup.student)  # gathers under FSDP
                    _periodic_eval(replace(setup, student=eval_student), metrics, done, is_main)
                if t.save_every and (done % t.save_every == 0 or done == t.steps):
                    state = full_model_state(accelerator, model)  # collective under FSDP; None off the main rank
                    optimizer_state = full_optimizer_state(accelerator, model, optimizer)
                    failure = None
                    if is_main:  # never a checkpoint of non-finite weights: the last finite one stays the newest
                        bad = nonfinite(state)
                        if bad:
                            failure = (f"weights became non-finite at step {done} ({', '.join(bad[:3])}); training "
                                       f"stopped (last finite checkpoint: {last_good or 'none was written'}); lower "
                                       "train.lr, enable train.clip_grad_norm, or check the data")
                        else:
                            try:
                                last_good = save(done, state, optimizer_state)
                            except KDForgeError as err:  # disk full: one line, the earlier checkpoints intact
                                failure = str(err)
                    failure = broadcast_object(accelerator, failure)  # also the barrier after rank 0's save
                    if failure:
                        raise KDForgeError(failure)
                    saved = done
                completed = done
                step_rng = torch.get_rng_state()
    except KeyboardInterrupt as stop:  # SIGINT, or SIGTERM turned into StopRequested
        signals.hold()
        how = f"stopped by {stop.signame}" if isinstance(stop, StopRequested) else "interrupted"
        if is_main:
            if world == 1 and t.save_every and completed > saved:  # no other rank to wait for: save here
                try:
                    last_good = save(completed, None, full_optimizer_state(accelerator, model, optimizer), step_rng)
                    note = f"saved a checkpoint of step {completed} to {last_good}"
                except KDForgeError as err:
                    note = f"could not save a checkpoint ({err})"
            elif last_good is not None:
                note = f"the last checkpoint is {last_good} (step {step_of(last_good)})"
            else:
                note = "no checkpoint was written yet, so a rerun starts over"
            log.warning("%s after %d of %d steps: %s; rerun the same command to resume", how, completed, t.steps, note)
        stop.reported = True  # the CLI adds no second line
        raise
    finally:
        bar.close()
        metrics.close()
    final_student = plain_student(accelerator, model, setup.student)
    if is_main:
        train_seconds = seconds_before + time.perf_counter() - t_start
        timing = {"train_seconds": train_seconds, "tokens_seen": tokens_seen,
                  "tokens_per_s": tokens_seen / train_seconds if train_seconds > 0 else None}
        finish(replace(setup, student=final_student), out, timing=timing, progress=progress, wall_start=wall_start)
    accelerator.wait_for_everyone()
    return out


def _periodic_eval(setup: Setup, metrics: MetricsLog, step: int, is_main: bool) -> None:
    if not is_main:
        return
    row = {"step": step, **setup.task.periodic_metrics(setup)}
    setup.student.train()
    metrics.write(row)


def finish(setup: Setup, out: Path, *, timing: dict[str, Any] | None = None, progress: bool = True,
           wall_start: float | None = None) -> dict[str, Any]:
    """Write held-out metrics (final.json) and export the student (out/student), both as the recipe's task says
    (kdforge.tasks: for causal_lm, a plain transformers folder with the tokenizer and a model card, measured as
    `kdforge eval` measures it). `timing`: the run's training seconds, tokens seen and tokens/s (from train)."""
    task = setup.task or task_for(setup.recipe)
    final = task.final_metrics(setup, progress=progress)
    final.update(timing or {})
    if wall_start is not None:
        final["wall_seconds"] = time.time() - wall_start  # this launch: loading, training and the final evaluation
    task.export(setup, out, final)
    with disk_full_as_error(out / "final.json", _DISK_HINT):
        atomic_write_json(out / "final.json", final)
    return final
