"""The pipeline's table and figure 5: success per stage (95% interval) and the RL reward curve."""

from __future__ import annotations

import os

__all__ = ["table", "draw"]


def table(results: list[dict]) -> str:
  """A fixed-width table of the per-stage held-out metrics."""
  head = (f"{'stage':<6} {'success':>8} {'95% interval':>16} {'turns':>6} {'calls':>6} "
          f"{'parallel':>8} {'tokens':>7} {'wall_s':>7}  by level")
  lines = [head, "-" * len(head)]
  for r in results:
    lo, hi = r["ci95"]
    levels = " ".join(f"{v:.2f}" for _, v in sorted(r.get("success_by_level", {}).items()))
    lines.append(f"{r['stage']:<6} {r['success']:>8.3f} {f'[{lo:.3f}, {hi:.3f}]':>16} "
                 f"{r['mean_turns']:>6.2f} {r['mean_tool_calls']:>6.2f} "
                 f"{r['parallel_call_share']:>8.2f} {r['tokens_per_episode']:>7.0f} "
                 f"{r['wall_s']:>7.1f}  {levels}")
  return "\n".join(lines)


def draw(results: list[dict], path: str) -> str:
  """Writes the two-panel PNG to `path` (matplotlib, no display needed); returns path."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
  names = [r["stage"] for r in results]
  success = [100 * r["success"] for r in results]
  lo = [100 * (r["success"] - r["ci95"][0]) for r in results]
  hi = [100 * (r["ci95"][1] - r["success"]) for r in results]
  ax.bar(names, success, yerr=[lo, hi], capsize=4, color="#4c72b0")
  for x, s in enumerate(success):
    ax.text(x, s + 1, f"{s:.0f}", ha="center", va="bottom")
  ax.set_ylabel("held-out success (%), 95% Wilson interval")
  ax.set_ylim(0, 100)
  ax.set_title("success per stage")
  curve = next((r["reward_curve"] for r in results if r["stage"] == "rl"), {})
  if curve:
    steps = sorted(int(k) for k in curve)
    ax2.plot(steps, [curve[str(s)] for s in steps], marker="o")
  ax2.set_xlabel("RL step")
  ax2.set_ylabel("mean rollout reward")
  ax2.set_title("RL reward")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
