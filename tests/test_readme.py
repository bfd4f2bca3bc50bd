"""The README's pure-function example runs as written and its loss is the flat per-branch one."""

import os
import re

import numpy as np

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _section_code(title: str) -> str:
  text = open(README).read()
  section = text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_pure_function_example_runs_and_matches_flat_branches():
  scope: dict = {}
  exec(compile(_section_code("Use the pure functions in your own JAX code"), README, "exec"),
       scope)
  params, group = np.asarray(scope["params"]), scope["group"]
  # Independent reference: on-policy (ratio 1), token-mean over all trained branch tokens,
  # loss = -sum_b sum_t m_b(t) A_b / sum_b sum_t m_b(t); the value at ratio 1 is that sum.
  num, den = 0.0, 0.0
  for t in group:
    num += -t.advantage * t.loss_mask.sum()
    den += t.loss_mask.sum()
  np.testing.assert_allclose(float(scope["value"]), num / den, rtol=1e-6)
  # Gradient: d/dparams of -sum A_b m_b(t) logp_t / den, logp from the bigram table.
  grad = np.zeros_like(params)
  for t in group:
    for i in range(1, len(t.tokens)):
      if t.loss_mask[i]:
        row = params[t.tokens[i - 1]]
        p = np.exp(row - row.max())
        p /= p.sum()
        onehot = np.eye(len(row))[t.tokens[i]]
        grad[t.tokens[i - 1]] += -t.advantage * (onehot - p) / den
  np.testing.assert_allclose(np.asarray(scope["grads"]), grad, rtol=1e-5, atol=1e-7)
  assert int(np.sum(np.asarray(scope["batch"]["mult"]) > 0)) == 6
