"""Where a run's metric rows go: metrics.jsonl always, and what `train.log_with` names besides.

- `csv`: metrics.csv in the run folder, written by kdforge: the same rows as metrics.jsonl (one column per key, in
  order of first appearance; a key a row lacks is an empty cell). It is always a function of metrics.jsonl: rebuilt
  from it when a run (re)starts and whenever a row brings a new column, so after a resume it equals an uninterrupted
  run's, like metrics.jsonl.
- any other name: an accelerate tracker (`Accelerator(log_with=...)`, `init_trackers`, `log`), on the main process.
  TensorBoard writes under RUN/logs/<recipe name>/; on resume it is told to drop the events after the checkpoint
  (`purge_step`), so its curves match the log too. The config each tracker records is the flattened recipe.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from .errors import KDForgeError
from .io import atomic_write_text, disk_full_as_error
from .recipe import TRACKERS, Recipe

_DISK_HINT = "use an --out on a larger disk"


def accelerate_trackers(names: list[str]) -> list[str]:
    """The accelerate tracker names among `names` (all but csv); refuses one whose package is not installed."""
    from accelerate.tracking import get_available_trackers

    available = {str(t) for t in get_available_trackers()}
    wanted = [n for n in names if n != "csv"]
    for name in wanted:
        if name not in available:
            raise KDForgeError(f"train.log_with names {name}, but its package is not installed; install it with "
                               f"`pip install {TRACKERS[name]}`, or drop {name} from train.log_with")
    return wanted


def flat_config(recipe: Recipe) -> dict[str, Any]:
    """The recipe as dotted keys with scalar values (what TensorBoard's hparams and the other trackers accept)."""
    out: dict[str, Any] = {"recipe_hash": recipe.hash()}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, (bool, int, float, str)):
            out[prefix] = value
        else:  # lists and nulls
            out[prefix] = json.dumps(value)

    walk("", recipe.model_dump(mode="json"))
    return out


class MetricsLog:
    """Appends metric rows (dicts with a `step`) to metrics.jsonl, metrics.csv and the accelerate trackers.
    Main process only."""

    def __init__(self, out: Path, log_with: list[str], accelerator=None):
        self.path = Path(out) / "metrics.jsonl"
        self.csv_path = Path(out) / "metrics.csv" if "csv" in log_with else None
        self.accelerator = accelerator if accelerator is not None and accelerator.log_with else None
        self.columns: list[str] = []

    def start(self, recipe: Recipe, start_step: int) -> None:
        """Rebuild metrics.csv from metrics.jsonl and start the trackers (`start_step`: the step training resumes
        from, 0 for a new run)."""
        if self.csv_path is not None:
            self._rebuild_csv()
        if self.accelerator is not None:
            kwargs = {"tensorboard": {"purge_step": start_step + 1}} if start_step else {}
            self.accelerator.init_trackers(recipe.name, config=flat_config(recipe), init_kwargs=kwargs)

    def write(self, row: dict[str, Any]) -> None:
        with disk_full_as_error(self.path, _DISK_HINT), open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.csv_path is not None:
            if set(row) <= set(self.columns):
                with disk_full_as_error(self.csv_path, _DISK_HINT), open(self.csv_path, "a", newline="") as f:
                    csv.DictWriter(f, self.columns, restval="", lineterminator="\n").writerow(row)
            else:
                self._rebuild_csv()
        if self.accelerator is not None:
            self.accelerator.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def close(self) -> None:
        """Finish the trackers (flush and close their files); accelerate's end_training would also tear down the
        process group, which kdforge does itself."""
        if self.accelerator is not None:
            for tracker in self.accelerator.trackers:
                tracker.finish()
            self.accelerator.trackers = []

    def _rebuild_csv(self) -> None:
        rows = ([json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
                if self.path.is_file() else [])
        self.columns = list(dict.fromkeys(k for row in rows for k in row)) or ["step"]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, self.columns, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        with disk_full_as_error(self.csv_path, _DISK_HINT):
            atomic_write_text(self.csv_path, buf.getvalue())
