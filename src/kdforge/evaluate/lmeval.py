"""Bridge to EleutherAI's lm-evaluation-harness (optional extra: `pip install 'kdforge[lmeval]'`).

`run_lm_eval(model, tokenizer, tasks)` hands an in-memory student to lm-eval's HFLM. Besides lm-eval's own task names
(which need their datasets, so a network), the built-in task `kdforge_heldout` is generated on the fly: a rolling
log-likelihood (perplexity) task over a local JSONL of held-out documents, so it runs offline.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ..errors import KDForgeError

HELDOUT_TASK = "kdforge_heldout"


def lm_eval_available() -> bool:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


def write_perplexity_task(folder: str | Path, documents: list[str], name: str = HELDOUT_TASK) -> Path:
    """A local lm-eval task: `<name>.yaml` (loglikelihood_rolling over the `text` field) + `<name>.jsonl`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents if d.strip()))
    config = "\n".join([
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(data.resolve()))}",
        "output_type: loglikelihood_rolling",
        "test_split: test",
        'doc_to_text: ""',
        'doc_to_target: "{{text}}"',
        "metric_list:",
        "  - metric: word_perplexity",
        "  - metric: byte_perplexity",
        "  - metric: bits_per_byte",
        "metadata:",
        "  version: 1.0",
        "",
    ])
    path = folder / f"{name}.yaml"
    path.write_text(config)
    return path


def split_documents(docs: list[str], max_chars: int = 2000, limit: int = 64) -> list[str]:
    """Cut documents at line ends into pieces of at most about max_chars characters (at most `limit` pieces)."""
    pieces: list[str] = []
    for doc in docs:
        current: list[str] = []
        size = 0
        for line in doc.splitlines():
            if current and size + len(line) > max_chars:
                pieces.append("\n".join(current))
                current, size = [], 0
            current.append(line)
            size += len(line) + 1
        if current:
            pieces.append("\n".join(current))
    return [p for p in pieces if p.strip()][:limit]


def run_lm_eval(model, tokenizer, tasks: list[str], *, heldout_documents: list[str] | None = None,
                include_path: str | Path | None = None, limit: int | float | None = None,
                batch_size: int = 8) -> dict[str, Any]:
    """Evaluate the model with lm-eval; returns {task: {metric: value}} (lm-eval's `results` section)."""
    if not lm_eval_available():
        raise KDForgeError("--lm-eval needs lm-evaluation-harness; install it with `pip install 'kdforge[lmeval]'`")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="kdforge-lmeval-") as tmp:
        paths: list[str] = [str(include_path)] if include_path else []
        if HELDOUT_TASK in tasks:
            if not heldout_documents:
                raise KDForgeError(f"task {HELDOUT_TASK} needs held-out documents (none were given)")
            write_perplexity_task(tmp, split_documents(heldout_documents))
            paths.append(tmp)
        manager = TaskManager(include_path=paths or None)
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise KDForgeError(f"lm-eval does not know task '{unknown[0]}'; pass its YAML folder with "
                               f"--lm-eval-include or use {HELDOUT_TASK}")
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                      log_samples=False, bootstrap_iters=0)
    if out is None:
        raise KDForgeError("lm-eval returned no results")
    results = {}
    for task, metrics in out["results"].items():
        results[task] = {k.split(",")[0]: v for k, v in metrics.items()
                         if isinstance(v, (int, float)) and not k.startswith("alias") and "stderr" not in k}
    return results
