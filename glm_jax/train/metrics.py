"""Training metrics: `workdir/metrics.jsonl` (one JSON object per logged step), TensorBoard event
files (tensorboardX), a PNG heatmap of expert load per MoE layer, and a tqdm progress bar."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tqdm
from absl import logging
from tensorboardX import SummaryWriter

POSTFIX = ("loss", "max_vio", "eval_accuracy", "reward_mean", "eval_reward")  # on the bar


class MetricsLogger:
    """Writes metrics of process 0. On resume, jsonl lines past the restored step are dropped so
    the file reads as one uninterrupted run."""

    def __init__(self, workdir: str | Path, *, start_step: int, total_steps: int,
                 enabled: bool = True):
        self.workdir = Path(workdir)
        self.enabled = enabled
        self.bar = tqdm.tqdm(total=total_steps, initial=start_step, disable=not enabled,
                             dynamic_ncols=True, desc="train")
        if not enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.workdir / "metrics.jsonl"
        _truncate_after(self.jsonl_path, start_step)
        self.tensorboard = SummaryWriter(str(self.workdir / "tensorboard"))

    def log(self, step: int, metrics: dict) -> None:
        """`step` counts completed steps (1-based). Arrays: per-layer MaxVio and expert loads."""
        if not self.enabled:
            return
        record = {"step": step}
        for name, value in metrics.items():  # every scalar: losses, rates, eval_* results
            if np.ndim(value) == 0 and np.issubdtype(np.asarray(value).dtype, np.number):
                record[name] = float(np.asarray(value))
        if "max_vio_per_layer" in metrics:
            record["max_vio_per_layer"] = np.asarray(metrics["max_vio_per_layer"]).round(4).tolist()
        if "expert_load" in metrics:
            load = np.asarray(metrics["expert_load"])
            record["expert_load"] = load.tolist()
            add_expert_histogram(self.tensorboard, load, step)
            write_load_heatmap(load, self.workdir / "expert_load.png", step)
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for name, value in record.items():
            if name != "step" and not isinstance(value, list):
                self.tensorboard.add_scalar(name, value, step)
        shown = {k: f"{record[k]:.4g}" for k in POSTFIX if k in record}
        if shown:
            self.bar.set_postfix(shown)

    def advance(self, steps: int = 1) -> None:
        self.bar.update(steps)

    def close(self) -> None:
        self.bar.close()
        if self.enabled:
            self.tensorboard.close()


def _records(path: Path):
    """(line, record) for each JSON object line of `path`; a line cut short by a kill or a full
    disk is skipped with a warning."""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            logging.warning("%s:%d: dropping a partly written line", path, number)
            continue
        if isinstance(record, dict):
            yield line, record


def read_records(path: Path, up_to_step: int) -> list[dict]:
    """The records of a metrics.jsonl with a `step` <= `up_to_step` (none if it is missing)."""
    if not path.exists():
        return []
    return [r for _, r in _records(path) if r.get("step", up_to_step + 1) <= up_to_step]


def _truncate_after(path: Path, step: int) -> None:
    """Keeps the records up to `step`; a partly written line is dropped."""
    if not path.exists():
        return
    kept = [line for line, record in _records(path) if record.get("step", step + 1) <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


def add_expert_histogram(writer: SummaryWriter, load: np.ndarray, step: int) -> None:
    """The histogram of routed token copies over expert ids, from the [L, E] counts (summed over
    layers): one bucket per expert, never one sample per token (at GLM-4.5 scale a step routes
    ~1e10 copies)."""
    totals = load.astype(np.float64).sum(axis=0)  # [E]
    ids = np.arange(totals.shape[0], dtype=np.float64)
    used = np.nonzero(totals)[0]
    if not used.size:
        return
    writer.add_histogram_raw(
        "expert_load", min=float(used[0]), max=float(used[-1]), num=float(totals.sum()),
        sum=float(ids @ totals), sum_squares=float((ids ** 2) @ totals),
        bucket_limits=(ids + 0.5).tolist(), bucket_counts=totals.tolist(), global_step=step)


def write_load_heatmap(load: np.ndarray, path: Path, step: int) -> None:
    """Expert load per MoE layer relative to the mean (1.0 = perfectly balanced)."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    relative = load / np.maximum(load.mean(axis=-1, keepdims=True), 1e-9)
    size = (min(16, max(4, load.shape[1] * 0.15 + 2)), min(12, max(2, load.shape[0] * 0.3 + 1)))
    fig, ax = plt.subplots(figsize=size)  # capped: 89 layers x 160 experts stays 1600 x 1200 px
    image = ax.imshow(relative, aspect="auto", cmap="viridis")
    ax.set(xlabel="expert", ylabel="MoE layer", title=f"expert load / mean, step {step}")
    fig.colorbar(image, ax=ax)
    _save_figure(fig, path)


def write_reward_curve(rows: list[dict], path: Path) -> None:
    """Held-out `eval_reward` and the rollouts' `reward_mean` against the step."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, style in (("reward_mean", dict(alpha=0.5, lw=1)), ("eval_reward", dict(marker="o"))):
        points = [(r["step"], r[name]) for r in rows if name in r]
        if points:
            ax.plot(*zip(*points), label=name, **style)
    ax.set(xlabel="step", ylabel="reward", title="GRPO reward")
    ax.legend()
    _save_figure(fig, path)


def _save_figure(fig, path: Path) -> None:
    """Written beside `path` and renamed over it: a reader never sees a half-written PNG."""
    from matplotlib import pyplot as plt

    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
