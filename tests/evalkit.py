"""Helpers shared by the evaluation, bench, report and reproduce tests, and the teacher-cache tests (not a test
module)."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  # name resolution fails locally, so nothing the browser itself tries can leave the machine
                  "--host-resolver-rules=MAP * ~NOTFOUND"]


def recipe_dict(assets: dict, out: Path, **train) -> dict:
    """The conftest tiny recipe, for fixtures with a wider scope than tiny_recipe."""
    return {
        "name": "tiny", "seed": 0, "output_dir": str(out),
        "teacher": {"model": str(assets["teacher"]), "dtype": "float32"},  # not the CPU-dependent auto
        "student": {"init": "config", "config": {"hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64}},
        "data": {"corpus": str(assets["train"]), "validation": [str(assets["val"])], "seq_len": 32,
                 "max_eval_tokens": 512},
        "objective": [{"loss": "cross_entropy", "weight": 0.5}, {"loss": "forward_kl", "weight": 0.5}],
        "train": {"steps": 4, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "save_every": 4, "log_every": 1,
                  "bf16": False, **train},
    }


def chromium(url: str, tmp: Path, *extra: str, timeout: int = 60) -> dict:
    """Run headless Chromium on a URL; return stdout, stderr, the console lines and every network request the page
    (not the browser itself) made, read from a NetLog."""
    netlog = tmp / "net.json"
    cmd = [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={tmp / 'profile'}", "--enable-logging=stderr", "--v=0",
           f"--log-net-log={netlog}", *extra, url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    requests = []
    if netlog.is_file():
        log = json.loads(netlog.read_text())
        names = {v: k for k, v in log["constants"]["logEventTypes"].items()}
        for e in log["events"]:
            params = e.get("params") or {}
            if (names.get(e["type"]) == "URL_REQUEST_START_JOB" and params.get("url")
                    and params.get("initiator") != "not an origin"):
                requests.append(params.get("url"))
    shutil.rmtree(tmp / "profile", ignore_errors=True)
    return {"stdout": proc.stdout, "stderr": proc.stderr, "returncode": proc.returncode, "console": console,
            "requests": requests}


class SyntheticTokenizer:
    """A 300-id vocabulary t0..t299: what a teacher cache records of a tokenizer (the sampled and hybrid cache tests)."""
    name_or_path = "synthetic-300"

    def get_vocab(self):
        return {f"t{i}": i for i in range(300)}

    def __len__(self):
        return 300
