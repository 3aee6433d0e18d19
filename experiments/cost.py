"""What a run of an experiment setting costs on this machine, measured before the long runs.

    python experiments/cost.py --setting sglr_resnet16 --clients 1,20 --seeds 3
    python experiments/cost.py --setting cifar_vgg_iid --clients 10 --algorithms psl,sl

For each (algorithm, C), builds the run exactly as the experiment scripts do
(`common.make_config`, then lfmjax's own `prepare`: data, partition, model, compiled
programs) and times, after a warm-up, one dispatch of `steps_per_dispatch` iterations
and one evaluation (the test split, and the validation split where the setting holds
one out). Writes `results/cost_<setting>.csv` with seconds per iteration, per
evaluation and for compiling, and the hours a run of `--plan_iterations` iterations
evaluated `--plan_evals` times would take.
"""
from __future__ import annotations

import os
import time

import jax

import common
from lfmjax.run.loop import prepare


def timed(fn, *args) -> tuple[float, object]:
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return time.perf_counter() - t0, out


def measure(config, log=lambda *a: None, skip_eval: bool = False) -> dict:
  t0 = time.perf_counter()
  prep = prepare(config, log=log)
  run = prep.run
  log(f"prepared in {time.perf_counter() - t0:.1f} s")
  compile_s, (state, _) = timed(run.multi_step, run.state, run.data)
  compile_s += time.perf_counter() - t0
  log(f"first dispatch (compile) done at {compile_s:.1f} s")
  step_s, (state, _) = timed(run.multi_step, state, run.data)  # the state is donated
  log(f"{config.steps_per_dispatch} iterations in {step_s:.2f} s")
  if skip_eval:
    return {"s_per_iteration": step_s / config.steps_per_dispatch, "s_per_eval": float("nan"),
            "compile_s": compile_s, "epochs_per_iteration": prep.epochs_per_iteration}
  splits = [prep.test] + ([prep.val] if prep.val is not None else [])
  evaluate = lambda: [run.evaluate(state, run.data.weights_C, prep.client_ids, s)
                      for s in splits]
  first_s, _ = timed(evaluate)
  log(f"first evaluation (compile) {first_s:.1f} s")
  eval_s, _ = timed(evaluate)
  log(f"evaluation {eval_s:.1f} s")
  return {"s_per_iteration": step_s / config.steps_per_dispatch, "s_per_eval": eval_s,
          "compile_s": compile_s, "epochs_per_iteration": prep.epochs_per_iteration}


def main(argv=None):
  p = common.common_flags(__doc__.splitlines()[0])
  p.add_argument("--clients", default="1,20", help="comma-separated C values")
  p.add_argument("--algorithms", default=None, help="comma-separated (default: all eight)")
  p.add_argument("--steps", type=int, default=5, help="iterations in the timed dispatch")
  p.add_argument("--plan_iterations", type=int, default=2500)
  p.add_argument("--plan_evals", type=int, default=10)
  p.add_argument("--skip_eval", action="store_true", help="time the iterations only")
  args = p.parse_args(argv)
  algorithms = args.algorithms.split(",") if args.algorithms else common.ALGORITHMS
  rows = []
  for c in (int(v) for v in args.clients.split(",")):
    for algorithm in algorithms:
      config = common.make_config(args, algorithm, c, args.plan_iterations)
      # SL's iteration is a local epoch of every client: one is plenty to time.
      config.steps_per_dispatch = 1 if algorithm == "sl" else args.steps
      cost = measure(config, log=lambda *a: print(f"  {algorithm} C={c}:", *a, flush=True),
                     skip_eval=args.skip_eval)
      hours = (args.plan_iterations * cost["s_per_iteration"]
               + args.plan_evals * cost["s_per_eval"] + cost["compile_s"]) / 3600
      row = {"algorithm": algorithm, "clients": c, "seeds": args.seeds,
             **{k: round(v, 4) for k, v in cost.items()},
             "plan_iterations": args.plan_iterations, "plan_evals": args.plan_evals,
             "plan_hours": round(hours, 3)}
      rows.append(row)
      print(row, flush=True)
      common.write_csv(os.path.join(args.out or common.RESULTS,
                                    f"cost_{args.setting}.csv"), rows)
  return rows


if __name__ == "__main__":
  main()
