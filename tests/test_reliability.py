"""Reliability and security of a run folder (issue #11): safe checkpoint loading, one run per folder, SIGTERM,
never a checkpoint of non-finite weights, leftover temporaries, damaged files, a recipe changed after a failed start,
and a full disk. All on the tiny offline models of conftest."""
from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from kdforge import Distiller
from kdforge.cli import app
from kdforge.errors import KDForgeError
from kdforge.recipe import parse_recipe
from kdforge.train import train

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}


def _quality(out: Path) -> dict:
    return {k: v for k, v in json.loads((out / "final.json").read_text())["student"].items() if k != "tokens_per_s"}


def _stopped_run(recipe: dict, monkeypatch, at: int = 4) -> Path:
    """Run the recipe (6 steps, checkpoints every 3) and stop it with Ctrl-C in step `at` (0-based): checkpoints at
    3 and, saved at the interruption, at `at`."""
    original = Distiller.forward

    def stops(self, batch, **kw):
        if kw.get("step") == at:
            raise KeyboardInterrupt
        return original(self, batch, **kw)

    monkeypatch.setattr(Distiller, "forward", stops)
    with pytest.raises(KeyboardInterrupt):
        train(parse_recipe(recipe), progress=False)
    monkeypatch.setattr(Distiller, "forward", original)
    return Path(recipe["output_dir"])


def _log(out: Path) -> list[dict]:
    """metrics.jsonl without its one wall-clock field."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


def _ckpt(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step_{step:08d}"


# 1. A resume never unpickles code -------------------------------------------------------------------------------

class _Planted:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_real_trainer_state_loads_with_weights_only(tiny_recipe, monkeypatch):
    out = _stopped_run(tiny_recipe, monkeypatch)
    for step in (3, 4):
        state = torch.load(_ckpt(out, step) / "trainer_state.pt", weights_only=True)
        assert state["step"] == step and state["rng"].dtype == torch.uint8 and state["optimizer"]["state"]


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_planted_pickle_in_a_checkpoint_is_refused_and_never_run(tiny_recipe, tmp_path, monkeypatch, writer):
    out = _stopped_run(tiny_recipe, monkeypatch)
    marker = tmp_path / "pwned"
    planted = _ckpt(out, 4) / "trainer_state.pt"
    if writer == "pickle":
        planted.write_bytes(pickle.dumps({"step": 4, "x": _Planted(marker)}))
    else:
        torch.save({"step": 4, "x": _Planted(marker)}, planted)
    with pytest.raises(KDForgeError) as err:
        train(parse_recipe(tiny_recipe), progress=False)
    assert not marker.exists()
    message = str(err.value)
    assert "\n" not in message and f"refusing to load {planted}" in message and "could run code" in message
    # the same through the CLI: one line, no traceback, and still nothing run
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(yaml.safe_dump(tiny_recipe))
    res = runner.invoke(app, ["distill", str(recipe_file), "--no-progress"])
    assert res.exit_code == 2 and "Traceback" not in res.output and not marker.exists()
    assert [line for line in res.output.splitlines() if line.startswith("error:")] == [f"error: {message}"]


# 2. One run per output folder ------------------------------------------------------------------------------------

_HOLD_LOCK = """
import sys, time
from pathlib import Path
from kdforge.rundir import RunLock
out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
lock = RunLock(out)
lock.acquire()
print("locked", flush=True)
time.sleep(300)
"""


def test_second_run_in_the_same_folder_is_refused_naming_the_holder(tiny_recipe, tmp_path):
    out = Path(tiny_recipe["output_dir"])
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True,
                              env=_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(KDForgeError) as err:
            train(parse_recipe(tiny_recipe), progress=False)
        message = str(err.value)
        assert f"output dir '{out}' is in use by another kdforge run (pid {holder.pid} on {socket.gethostname()}, " \
               "started " in message and "use another --out" in message and "\n" not in message
        assert not (out / "metrics.jsonl").exists() and not (out / "manifest.json").exists()
        recipe_file = tmp_path / "r.yaml"
        recipe_file.write_text(yaml.safe_dump(tiny_recipe))
        res = runner.invoke(app, ["distill", str(recipe_file), "--no-progress"])
        assert res.exit_code == 2 and res.output.strip() == f"error: {message}"
    finally:
        holder.kill()  # SIGKILL: no cleanup; its lock file and holder note stay behind
        holder.wait()
    assert (out / ".kdforge.lock").exists() and (out / ".kdforge.holder.json").exists()
    assert (train(parse_recipe(tiny_recipe), progress=False) / "final.json").is_file()  # a dead holder blocks nothing
    assert not (out / ".kdforge.holder.json").exists()  # released at the end of the run


# 3. SIGTERM ------------------------------------------------------------------------------------------------------

_SIGTERM_CHILD = """
import sys, time
from pathlib import Path
from kdforge.cli import app
from kdforge.distiller import Distiller
original = Distiller.forward
recipe, ready = sys.argv[1:3]
def forward(self, batch, **kw):
    if kw.get("step") == 4:  # steps 1-4 done (checkpoint at 3): wait here for the test's SIGTERM
        Path(ready).write_text("ready")
        time.sleep(120)
    return original(self, batch, **kw)
Distiller.forward = forward
sys.argv = ["kdforge", "distill", recipe, "--no-progress"]
app()
"""


def test_sigterm_saves_at_the_step_reached_and_the_rerun_resumes_exactly(tiny_recipe, tmp_path):
    ref = train(parse_recipe({**tiny_recipe, "output_dir": str(tmp_path / "ref")}), progress=False)
    out = Path(tiny_recipe["output_dir"])
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(yaml.safe_dump(tiny_recipe))
    ready = tmp_path / "ready"
    child = subprocess.Popen([sys.executable, "-c", _SIGTERM_CHILD, str(recipe_file), str(ready)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.time() + 240
    while not ready.exists() and child.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert ready.exists(), child.communicate()
    child.send_signal(signal.SIGTERM)
    stdout, stderr = child.communicate(timeout=120)
    assert child.returncode == 143, stdout + stderr  # the conventional exit status of a SIGTERM
    assert "Traceback" not in stderr and "interrupted;" not in stderr, stderr  # one line, not two
    saved = _ckpt(out, 4)
    line = (f"stopped by SIGTERM after 4 of 6 steps: saved a checkpoint of step 4 to {saved}; rerun the same "
            "command to resume")
    assert line in stderr.splitlines(), stderr
    assert saved.is_dir() and not (out / "final.json").exists()
    assert not [p for p in out.rglob(".*") if p.name not in (".kdforge.lock",)]  # no temporaries, no holder note
    assert _quality(train(parse_recipe(tiny_recipe), progress=False)) == _quality(ref)  # bit-identical
    assert _log(out) == _log(ref)


def test_a_signal_during_the_weight_update_waits_for_the_end_of_the_step():
    from kdforge.interrupts import StopRequested, StopSignals

    reached, before = [], signal.getsignal(signal.SIGTERM)
    with StopSignals() as signals:
        with pytest.raises(StopRequested) as err:
            with signals.critical():
                os.kill(os.getpid(), signal.SIGTERM)
                reached.append("end of block")
        assert err.value.signame == "SIGTERM" and reached == ["end of block"]
        with pytest.raises(StopRequested):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # interrupted by the handler
    assert signal.getsignal(signal.SIGTERM) == before


# 4. Never a checkpoint of non-finite weights ---------------------------------------------------------------------

def test_non_finite_weights_are_never_saved_and_the_stop_names_the_last_finite_checkpoint(tiny_recipe, monkeypatch):
    original = torch.optim.AdamW.step
    steps = []

    def step_then_nan_at_6(self, *args, **kwargs):  # the update of step 6 leaves NaN weights (its loss was finite)
        result = original(self, *args, **kwargs)
        steps.append(1)
        if len(steps) == 6:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_nan_at_6)
    out = Path(tiny_recipe["output_dir"])
    with pytest.raises(KDForgeError, match=r"^weights became non-finite at step 6 \(student\.[^)]*\); training "
                                           rf"stopped \(last finite checkpoint: {_ckpt(out, 3)}\)"):
        train(parse_recipe(tiny_recipe), progress=False)
    assert not _ckpt(out, 6).exists() and _ckpt(out, 3).is_dir()


def test_a_checkpoint_with_non_finite_weights_is_passed_over_on_resume(tiny_recipe, tmp_path, monkeypatch, caplog):
    from safetensors.torch import load_file, save_file

    ref = train(parse_recipe({**tiny_recipe, "output_dir": str(tmp_path / "ref")}), progress=False)
    out = _stopped_run(tiny_recipe, monkeypatch)
    weights = _ckpt(out, 4) / "student" / "model.safetensors"  # as an older kdforge could have saved it
    state = load_file(str(weights))
    name = next(iter(state))
    state[name][0] = float("inf")
    save_file(state, str(weights), metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING, logger="kdforge"):
        resumed = train(parse_recipe(tiny_recipe), progress=False)
    assert f"checkpoint step_00000004 is unusable: {_ckpt(out, 4)} holds non-finite weights ({name}" in caplog.text
    assert "resuming from step_00000003 instead" in caplog.text
    assert _quality(resumed) == _quality(ref)


# 5. Leftover temporaries -----------------------------------------------------------------------------------------

def test_leftover_temporaries_are_removed_when_the_next_run_starts(tiny_recipe, monkeypatch, caplog):
    out = _stopped_run(tiny_recipe, monkeypatch)
    ckpts = out / "checkpoints"
    leftovers = [out / ".metrics.jsonl.tmp-ab12cd34", out / ".manifest.json.x1y2z3_4",  # this / older kdforge
                 ckpts / ".step_00000006.tmp-q9w8e7r6", out / ".student.tmp-00aa11bb", out / ".student.k3j4h5g6",
                 ckpts / ".step_00000003.old"]
    for p in leftovers:
        if "step_" in p.name or "student" in p.name:
            (p / "student").mkdir(parents=True)
            (p / "student" / "model.safetensors").write_bytes(b"partial")
        else:
            p.write_text("partial")
    kept = [out / "notes.txt", out / ".gitignore", out / ".hidden.cfg", out / ".env.template", out / ".foo.metadata",
            out / ".notes.old"]  # a user's hidden files, even of the shapes of older kdforge temporaries
    for p in kept:
        p.write_text("mine")
    with caplog.at_level(logging.INFO, logger="kdforge"):
        train(parse_recipe(tiny_recipe), progress=False)
    assert not [p for p in leftovers if p.exists()] and all(p.read_text() == "mine" for p in kept)
    assert f"removed 4 temporary file(s) left by an interrupted write in {out}: " in caplog.text
    assert f"removed 2 temporary file(s) left by an interrupted write in {ckpts}: " in caplog.text
    assert ".metrics.jsonl.tmp-ab12cd34" in caplog.text and ".step_00000006.tmp-q9w8e7r6" in caplog.text


def test_an_interrupted_directory_swap_is_put_back(tmp_path):
    from kdforge.io import remove_temporaries

    (tmp_path / ".student.old").mkdir()  # killed between moving student/ aside and moving the new one in
    (tmp_path / ".student.old" / "config.json").write_text("{}")
    (tmp_path / ".student.tmp-abcdefgh").mkdir()
    remove_temporaries(tmp_path)
    assert (tmp_path / "student" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]


# 6. Damaged checkpoints and manifests ----------------------------------------------------------------------------

@pytest.mark.parametrize("file,damage", [("trainer_state.pt", "truncate"), ("student/model.safetensors", "empty"),
                                         ("trainer_state.pt", "delete")])
def test_a_damaged_checkpoint_falls_back_to_the_newest_intact_one(tiny_recipe, tmp_path, monkeypatch, caplog, file,
                                                                 damage):
    ref = train(parse_recipe({**tiny_recipe, "output_dir": str(tmp_path / "ref")}), progress=False)
    out = _stopped_run(tiny_recipe, monkeypatch)
    bad = _ckpt(out, 4) / file
    if damage == "truncate":
        bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    elif damage == "empty":
        bad.write_bytes(b"")
    else:
        bad.unlink()
    with caplog.at_level(logging.WARNING, logger="kdforge"):
        resumed = train(parse_recipe(tiny_recipe), progress=False)
    why = "is missing" if damage == "delete" else "is truncated or corrupt"
    assert f"checkpoint step_00000004 is unusable: {bad} {why}" in caplog.text
    assert "resuming from step_00000003 instead" in caplog.text
    assert _quality(resumed) == _quality(ref) and _log(resumed) == _log(ref)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000003", "step_00000006"]


def test_load_checkpoint_names_the_bad_file(tiny_recipe, monkeypatch):
    from kdforge.train import load_checkpoint, prepare

    out = _stopped_run(tiny_recipe, monkeypatch)
    bad = _ckpt(out, 4) / "trainer_state.pt"
    bad.write_bytes(b"")
    setup = prepare(parse_recipe(tiny_recipe))
    optimizer = torch.optim.AdamW(setup.distiller.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    with pytest.raises(KDForgeError, match=rf"^checkpoint {bad} is truncated or corrupt .*delete {_ckpt(out, 4)}"):
        load_checkpoint(_ckpt(out, 4), setup.distiller, optimizer, scheduler)


@pytest.mark.parametrize("content", ["", "{\"recipe_h", "[1, 2]"])
def test_an_empty_or_corrupt_manifest(tiny_recipe, tmp_path, monkeypatch, caplog, content):
    out = Path(tiny_recipe["output_dir"])
    out.mkdir(parents=True)
    (out / "manifest.json").write_text(content)  # no checkpoint yet: rebuilt
    with caplog.at_level(logging.WARNING, logger="kdforge"):
        train(parse_recipe(tiny_recipe), progress=False)
    assert "was empty or corrupt" in caplog.text and "so it is rebuilt" in caplog.text
    assert json.loads((out / "manifest.json").read_text())["recipe_hash"] == parse_recipe(tiny_recipe).hash()

    stopped = _stopped_run({**tiny_recipe, "output_dir": str(tmp_path / "stopped")}, monkeypatch)
    (stopped / "manifest.json").write_text(content)  # with checkpoints: which recipe they are is unknown
    recipe = {**tiny_recipe, "output_dir": str(stopped)}
    with pytest.raises(KDForgeError, match=r"manifest.json is empty or corrupt .*delete manifest.json and rerun to "
                                           "rebuild it, otherwise use another --out") as err:
        train(parse_recipe(recipe), progress=False)
    assert "\n" not in str(err.value)
    (stopped / "manifest.json").unlink()  # the fix the message names
    assert (train(parse_recipe(recipe), progress=False) / "final.json").is_file()


# 7. A recipe corrected after a failed start ----------------------------------------------------------------------

def test_a_corrected_recipe_may_reuse_the_folder_of_a_run_that_never_checkpointed(tiny_recipe, monkeypatch, caplog):
    original = Distiller.forward

    def fails_at_step_0(self, batch, **kw):
        raise ValueError("bad loss argument")

    monkeypatch.setattr(Distiller, "forward", fails_at_step_0)
    with pytest.raises(ValueError):
        train(parse_recipe(tiny_recipe), progress=False)
    out = Path(tiny_recipe["output_dir"])
    old_hash = json.loads((out / "manifest.json").read_text())["recipe_hash"]
    monkeypatch.setattr(Distiller, "forward", original)
    corrected = parse_recipe({**tiny_recipe, "seed": 1})
    with caplog.at_level(logging.INFO, logger="kdforge"):
        train(corrected, progress=False)
    assert f"holds the manifest of a run of another recipe (hash {old_hash}) that stopped before its first " \
           "checkpoint" in caplog.text
    assert json.loads((out / "manifest.json").read_text())["recipe_hash"] == corrected.hash() != old_hash
    with pytest.raises(KDForgeError, match="different recipe"):  # once it has checkpoints, another is refused
        train(parse_recipe({**tiny_recipe, "seed": 2}), progress=False)


def test_another_recipe_is_refused_once_a_checkpoint_exists(tiny_recipe, monkeypatch):
    _stopped_run(tiny_recipe, monkeypatch, at=2)  # no regular checkpoint yet; the interruption saves step 2
    with pytest.raises(KDForgeError, match="holds a run of a different recipe"):
        train(parse_recipe({**tiny_recipe, "seed": 1}), progress=False)


# 8. A full disk --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs "
                                                  "0\nbasic_ios::clear: iostream error")])
def test_a_full_disk_while_saving_is_one_line_and_keeps_the_previous_checkpoint(tiny_recipe, monkeypatch, failure):
    from kdforge.checkpoints import read_checkpoint
    from kdforge.io import mount_point

    original = torch.save

    def fills_at_step_6(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == 6:
            Path(f).write_bytes(b"partial")
            raise failure
        return original(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fills_at_step_6)
    out = Path(tiny_recipe["output_dir"])
    with pytest.raises(KDForgeError) as err:
        train(parse_recipe(tiny_recipe), progress=False)
    assert str(err.value) == (f"disk full while writing {_ckpt(out, 6)}; free space on {mount_point(out)} or lower "
                              "train.keep_checkpoints (now 2) or use an --out on a larger disk (the earlier "
                              "checkpoints are intact), then rerun the same command")
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000003"]  # no partial folder left
    assert read_checkpoint(_ckpt(out, 3)).step == 3
    monkeypatch.setattr(torch, "save", original)  # space freed: the rerun resumes from step 3
    assert (train(parse_recipe(tiny_recipe), progress=False) / "final.json").is_file()


def test_a_cache_build_removes_the_temporaries_of_a_killed_one(tiny_assets, tmp_path, caplog):
    from kdforge.models import load_teacher, load_tokenizer
    from kdforge.recipe import ModelSpec
    from kdforge.teachers.cache import CacheOptions, build_cache

    spec = ModelSpec(model=str(tiny_assets["teacher"]), dtype="float32")
    tokenizer = load_tokenizer(spec)
    ids = torch.tensor(tokenizer(tiny_assets["train"].read_text()[:4000])["input_ids"][: 8 * 32]).view(8, 32)
    out = tmp_path / "cache"
    out.mkdir()
    leftovers = [out / ".shard_00000.safetensors.tmp-abcdefgh", out / ".index.json.a1b2c3d4"]
    for p in leftovers:
        p.write_bytes(b"partial")
    with caplog.at_level(logging.INFO, logger="kdforge"):
        build_cache(load_teacher(spec), tokenizer, ids, out, teacher_spec=spec.model_dump(),
                    options=CacheOptions(k=8, shard_blocks=4, batch_size=4))
    assert not [p for p in leftovers if p.exists()] and "removed 2 temporary file(s)" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "shard_00000.safetensors", "shard_00001.safetensors"]


def test_atomic_writes_get_the_usual_permissions_not_owner_only(tmp_path, monkeypatch):
    """Issue 16: final.json, the report and the student folder were mode 0600/0700, so a teammate could not open
    them. Atomic writes now give what a plain open()/mkdir would under the user's umask."""
    from kdforge.io import atomic_write_dir, atomic_write_text

    import kdforge.io

    monkeypatch.setattr(kdforge.io, "_UMASK", 0o022)
    atomic_write_text(tmp_path / "final.json", "{}")
    atomic_write_dir(tmp_path / "student", lambda d: (d / "config.json").write_text("{}"))
    assert (tmp_path / "final.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "student").stat().st_mode & 0o777 == 0o755
