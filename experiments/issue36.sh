#!/usr/bin/env bash
# Issue 36's runs (experiments/README.md, "Labels"): the eight algorithms and the seven
# U-shaped ones in the resnet16 SGLR setting of issue 16, C = 10, 3 seeds, then the
# defences on PSL and LocFedMix-SL, each run attacked for labels as soon as it is trained
# (and the U-shaped ones for inputs too). Every run and report is kept in its workdir,
# so running this again resumes where it stopped: a finished and attacked run is re-read,
# an unfinished one resumes from its last checkpoint.
#
#     D=/path/to/data bash experiments/issue36.sh        # D holds fashion-mnist/
set -euo pipefail
cd "$(dirname "$0")"
D=${D:-../../shared/data}
PY=${PY:-python}
$PY labels.py --setting sglr_resnet16 --clients 10 --iterations 625 --eval_every 125 \
    --eval_clients 2 --devices 1 --seeds 3 --data_dir "$D/fashion-mnist"
$PY tables.py labels_sglr_resnet16
