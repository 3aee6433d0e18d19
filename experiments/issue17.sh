#!/usr/bin/env bash
# Issue 17's runs (experiments/README.md, "Privacy"), after issue 16's: the eight
# algorithms at C = 10 are issue 16's runs (re-read, then attacked), the twelve
# LocFedMix-SL variants are new. Every run and every attack report is kept in the run's
# workdir, so running this again resumes where it stopped.
#
#     D=/path/to/data bash experiments/issue17.sh        # D holds fashion-mnist/
set -euo pipefail
cd "$(dirname "$0")"
D=${D:-../../shared/data}
PY=${PY:-python}
$PY privacy.py --setting sglr_resnet16 --clients 10 --iterations 625 --eval_every 125 \
    --eval_clients 2 --seeds 3 --devices 1 --data_dir "$D/fashion-mnist"
