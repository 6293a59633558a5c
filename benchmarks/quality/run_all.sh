#!/usr/bin/env bash
# The whole quality benchmark, in the order it was recorded (results.jsonl, README.md).
#   bash benchmarks/quality/run_all.sh          # 2-core CPU: about 9 hours
#   bash benchmarks/quality/run_all.sh gpu      # a CUDA machine, 224 px: sized for < 10 minutes on one H200-class GPU
set -euo pipefail
cd "$(dirname "$0")/../.."
run="python benchmarks/quality/run.py"
frozen="-S train.margin=0.75 -S train.margin_relative=true"   # tuned for fixed centres (tuning rows in results.jsonl)

if [ "${1:-cpu}" = gpu ]; then
    for protocol in I II; do
        epochs=$([ $protocol = I ] && echo 15 || echo 3)
        $run --preset gpu --protocol $protocol --bits 48 --epochs $epochs --method adalabelhash --tag gpu
        $run --preset gpu --protocol $protocol --bits 48 --epochs $epochs --method frozen --tag gpu $frozen
        $run --preset gpu --protocol $protocol --bits 48 --epochs $epochs --method csq --tag gpu
    done
    exit 0
fi

# Headline rows, 48 bits: protocol I at 96 px for 30 epochs (~42 min of training each),
# protocol II at 64 px for 5 epochs (~the same time on 10x the images).
for method in adalabelhash frozen csq; do
    extra=$([ $method = frozen ] && echo "$frozen" || true)
    $run --protocol I --bits 48 --epochs 30 -S train.image_size=96 --method $method --tag head $extra
done
for method in adalabelhash frozen csq; do
    extra=$([ $method = frozen ] && echo "$frozen" || true)
    $run --protocol II --bits 48 --epochs 5 --method $method --tag head $extra
done
# The other code lengths, cheaper: 64 px, 8 epochs (I) and 2 epochs (II).
for protocol in I II; do
    epochs=$([ $protocol = I ] && echo 8 || echo 2)
    for bits in 16 32 64; do
        for method in adalabelhash frozen csq; do
            extra=$([ $method = frozen ] && echo "$frozen" || true)
            $run --protocol $protocol --bits $bits --epochs $epochs --method $method --tag cheap $extra
        done
    done
done
