#!/usr/bin/env bash
# Reproduces the README's results table: the real sample at N0 = 4096 in both domains,
# with the baselines at their default parameters (as `tact demo` runs them) and with the
# FBP scaling and BM3D sigma chosen on synthetic training patients (the sample is a single
# patient, so it has no training split of its own). About 40 minutes on 2 cores;
# DOMAINS=physical runs one domain only.
set -euo pipefail
cd "$(dirname "$0")/.."
tact=.venv/bin/tact
for domain in ${DOMAINS:-physical lodopab}; do
  run=runs/readme-$domain
  # 1. The sample with default baselines (FBP Hann 0.641, BM3D sigma 0.075).
  $tact -q demo --out "$run/default" --domain "$domain"
  # 2. Tune on two phantom patients simulated with the same settings.
  $tact -q phantom --out "$run/phantom-lits" --volumes 2 --slices 6 --seed 0
  $tact -q simulate --lits "$run/phantom-lits" --out "$run/phantom" --domain "$domain" --test-fraction 0.5
  $tact -q baseline fbp --dataset "$run/phantom" --tune-slices 5
  $tact -q baseline bm3d --dataset "$run/phantom" --sweep --sweep-slices 4
  read -r scaling sigma < <(.venv/bin/python -c "
import json, sys; m = json.load(open('$run/phantom/dataset.json'))['methods']
print(m['fbp']['frequency_scaling'], m['bm3d']['sigma_psd'])")
  # 3. Apply the tuned parameters to a copy of the sample's data set.
  rm -rf "$run/tuned" && mkdir -p "$run/tuned" && cp -r "$run/default/dataset" "$run/tuned/dataset"
  $tact -q baseline fbp --dataset "$run/tuned/dataset" --frequency-scaling "$scaling"
  $tact -q baseline bm3d --dataset "$run/tuned/dataset" --sigma-psd "$sigma"
  $tact -q evaluate --dataset "$run/tuned/dataset" --out "$run/tuned/report"
  echo "== $domain: default baselines"; grep '|' "$run/default/report/table_reconstruction.md"
  echo "== $domain: FBP scaling $scaling and BM3D sigma $sigma tuned on phantom patients"
  grep '|' "$run/tuned/report/table_reconstruction.md"
done
