"""Progress of long phases: plain periodic lines in a log, a bar whose counter and ETA fit 80 columns in a terminal,
an ETA from the mean step time (slow steps too), and the run's wall time and tokens/s in final.json."""
from __future__ import annotations

import io
import json
import re
import time

from kdforge import progress
from kdforge.distiller import Distiller
from kdforge.recipe import parse_recipe
from kdforge.train import train


def test_a_log_gets_a_line_per_30s_with_step_total_elapsed_and_eta(tiny_recipe, monkeypatch, capsys):
    now = [1000.0]
    monkeypatch.setattr(progress, "clock", lambda: now[0])
    forward = Distiller.forward

    def slow_forward(self, *args, **kwargs):  # each training step "sleeps" 40 s on the progress clock
        now[0] += 40.0
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(Distiller, "forward", slow_forward)
    out = train(parse_recipe(tiny_recipe), progress=True)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("tiny: step ")]
    steps = [int(re.match(r"tiny: step (\d+)/6", line).group(1)) for line in lines]
    assert {0, 1, 2, 3, 4, 5, 6} <= set(steps), err  # one line per 40-s step, and the start
    third = next(line for line in lines if line.startswith("tiny: step 3/6"))
    assert "elapsed 0:02:00" in third and "ETA 0:02:00" in third and "40.00 s/step" in third  # mean step time x 3
    assert "loss=" in third
    assert re.search(r"loading teacher .*: done in", err) and "final evaluation: batch" in err
    final = json.loads((out / "final.json").read_text())
    assert final["train_seconds"] > 0 and final["tokens_per_s"] > 0 and final["wall_seconds"] >= final["train_seconds"]
    assert final["tokens_seen"] == 6 * 4 * 31


def test_the_counter_and_eta_stay_visible_at_80_columns_with_three_loss_terms(monkeypatch):
    from rich.console import Console

    now = [0.0]
    monkeypatch.setattr(progress, "clock", lambda: now[0])
    bar = progress.Progress("minilm-distilled-long-name", 240, terminal=True, width=80, stream=io.StringIO())
    try:
        now[0] = 120 * 45.0  # steps of 45 s: rich's own ETA showed -:--:-- past 30 s a step
        bar.update(120, {"loss": 7.1234, "cross_entropy": 5.4321, "forward_kl": 3.2109, "minilm_relations": 1.2345})
        screen = Console(file=io.StringIO(), width=80)
        for renderable in bar.bar.get_renderables():
            screen.print(renderable)
        text = screen.file.getvalue()
    finally:
        bar.close()
    assert all(len(line) <= 80 for line in text.splitlines()), text
    assert "120/240" in text and "ETA 1:30:00" in text, text
    assert "cross_entropy=5.432" in text  # the terms, on their own line


def test_a_phase_without_a_count_logs_start_heartbeat_and_end(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(progress, "clock", lambda: now[0])
    stream = io.StringIO()
    with progress.Progress("loading teacher x", None, stream=stream, interval=30):
        now[0] = 31.0
        for _ in range(40):  # the heartbeat thread looks once a second
            if stream.getvalue().count("\n") > 1:
                break
            time.sleep(0.1)
        now[0] = 62.0
    lines = stream.getvalue().splitlines()
    assert lines == ["loading teacher x: elapsed 0:00:00", "loading teacher x: elapsed 0:00:31",
                     "loading teacher x: done in 0:01:02"]
