"""A whole simulation run: load the data, build the round, train, evaluate, report.

The CLI (`lfmjax.main`) is a thin wrapper over `train_and_evaluate(config, workdir)`;
`train(config, workdir)` also returns the trained state and the evaluation history.
The work lives in `lfmjax.run`: `loop` (prepare, the loop, the summary), `workdir`
(metrics.jsonl, eval.csv, accuracy.png, TensorBoard events, resume), `validate`,
`progress`. This module keeps the names callers import.
"""
__all__ = ["ConfigError", "Interrupted", "MetricsWriter", "PlacedRun", "Progress",
           "RunResult", "TrainingError", "place_run", "train", "train_and_evaluate",
           "validate", "write_atomically"]

from lfmjax.run.loop import (Interrupted, PlacedRun, RunResult, TrainingError, place_run,  # noqa: F401
                             train, train_and_evaluate)
from lfmjax.run.progress import Progress  # noqa: F401
from lfmjax.run.validate import ConfigError, validate  # noqa: F401
from lfmjax.run.workdir import MetricsWriter, write_atomically  # noqa: F401
