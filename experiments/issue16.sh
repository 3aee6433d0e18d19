#!/usr/bin/env bash
# Issue 16's runs, in the order the claims need them (experiments/README.md, "Issue 16").
#
#     D=/path/to/data bash experiments/issue16.sh        # D holds fashion-mnist/ and cifar10-jpg.tar.gz
#
# Every run has its own checkpointed workdir named by its config, so running this again
# after an interruption resumes the run it was in (losing at most one evaluation
# interval) and re-reads the finished ones; each step's CSV and plots are rewritten
# from all of its runs. Stop it at any point: nothing finished is lost.
set -euo pipefail
cd "$(dirname "$0")"
D=${D:-../../shared/data}
PY=${PY:-python}

# resnet16 in SGLR's setting: 625 iterations = 5 local epochs (SL: 5 iterations, one
# local epoch each), x0.1 at 80 %, validation and test every local epoch.
R=(--setting sglr_resnet16 --seeds 3 --devices 1 --data_dir "$D/fashion-mnist"
   --iterations 625 --eval_every 125 --eval_clients 2)

# 1. C = 20: scalability's column, the convergence and latency curves, PSL and SGLR
#    against SGLR's published numbers.
$PY scalability.py "${R[@]}" --clients 20
$PY convergence.py "${R[@]}" --clients 20                  # the same runs, re-read
# 2. C = 1 (cheap; the published C = 1 numbers), then C = 10, which the ablation shares.
$PY scalability.py "${R[@]}" --clients 1
$PY scalability.py "${R[@]}" --clients 10
# 3. The ablation at C = 10: PSL + each subset of {Loc, Fed, Mix}.
$PY ablation.py "${R[@]}" --clients 10
# 4. C = 5, the rest of the C grid but C = 2.
$PY scalability.py "${R[@]}" --clients 5
# 5. CIFAR-10, the VGG-style model at full width, C = 10, IID then Dirichlet(0.3).
V=(--seeds 3 --devices 1 --data_dir "$D" --clients 10 --iterations "${CIFAR_ITERATIONS:-400}"
   --eval_every 100 --eval_clients 2)
$PY scalability.py --setting cifar_vgg_iid "${V[@]}"
$PY scalability.py --setting cifar_vgg_dir03 "${V[@]}"
$PY convergence.py --setting cifar_vgg_iid "${V[@]}"     # the same runs, re-read: curves
$PY convergence.py --setting cifar_vgg_dir03 "${V[@]}"
# 6. C = 2, last: the issue's first cut when the budget runs out (SKIP_C2=1 skips it).
[ -n "${SKIP_C2:-}" ] || $PY scalability.py "${R[@]}" --clients 2
# Tables and the time-to-target, from the finished runs (seconds).
$PY latency.py --setting sglr_resnet16 --target 80
$PY latency.py --setting sglr_resnet16 --target 85
for t in scalability_sglr_resnet16 bestval_scalability_sglr_resnet16 \
         published_scalability_sglr_resnet16 convergence_sglr_resnet16 \
         latency_sglr_resnet16_80 latency_sglr_resnet16_85 ablation_sglr_resnet16 \
         plateau_scalability_sglr_resnet16 scalability_cifar_vgg_iid \
         scalability_cifar_vgg_dir03 convergence_cifar_vgg_iid \
         convergence_cifar_vgg_dir03; do
  $PY tables.py "$t"
done > results/issue16_tables.md
