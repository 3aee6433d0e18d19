#!/usr/bin/env bash
# Issue 35's runs (experiments/README.md, "Transformers"): split LoRA fine-tuning of the
# pretrained byte LM, then the eight algorithms on the split ViT with the inversion
# attack on its tokens. Every run (and every attack report) is kept in its workdir, so
# running this again resumes where it stopped: a finished run is re-read, an unfinished
# one resumes from its last checkpoint. The pretrained backbone's final checkpoint is
# committed (experiments/results/runs/psl_C1-b422d00f), so fine-tuning resumes on a
# fresh clone without pretraining again.
#
#     D=/path/to/data bash experiments/issue35.sh        # D holds cifar10-jpg.tar.gz
# Run from the repository's root, where transformers.py resolves paths (D included).
set -euo pipefail
cd "$(dirname "$0")/.."
D=${D:-../shared/data}
PY=${PY:-python}
$PY experiments/transformers.py lora
$PY experiments/transformers.py vit --data_dir "$D"
