"""The README's API example runs as written (with synthetic data in its placeholders)."""
import os
import re

import numpy as np

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def test_readme_api_example_runs():
  text = open(README).read()
  section = text[text.index("## Using the round in your own JAX code"):]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  rng = np.random.default_rng(0)
  sizes = np.full(10, 40)
  namespace = {
      "train_x_uint8": rng.integers(0, 256, (400, 28, 28, 1), dtype=np.uint8),
      "train_y": rng.integers(0, 10, 400).astype(np.int32),
      "idx_CxM": np.arange(400).reshape(10, 40), "sizes_C": sizes,
      "x_example_BxHxWxC": np.zeros((1, 28, 28, 1), np.float32)}
  exec(compile(code, "README.md", "exec"), namespace)
  state, metrics = namespace["round_step"](namespace["state"], namespace["data"])
  assert np.isfinite(float(metrics["loss_real"]))
  assert "lr_server" in metrics and "lr_client" not in metrics  # the user's tx logs none
  assert int(state.step) == 1
