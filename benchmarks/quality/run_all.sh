#!/usr/bin/env bash
# The whole quality benchmark, in the order it was recorded (results.jsonl, README.md).
#   bash benchmarks/quality/run_all.sh          # 2-core CPU, the first recorded rows (`head`, `cheap`): about 3 hours on an idle machine
#   bash benchmarks/quality/run_all.sh tune     # 2-core CPU, the tuning rows (protocol I, 48 bits, 64 px, 8 epochs): about 45 minutes
#   bash benchmarks/quality/run_all.sh more     # 2-core CPU, protocol II: 16/32/64 bits at 2 epochs, 48 bits at 4: about 2.5 hours
#   bash benchmarks/quality/run_all.sh r128     # 2-core CPU, protocol I at 48 bits, 128 px for 20 epochs: about 2 hours
#   bash benchmarks/quality/run_all.sh e8       # 2-core CPU, protocol II at 48 bits, 64 px for 8 epochs, and AdaLabelHash with centre pull (weights 1 and 2): about 3 hours
#   bash benchmarks/quality/run_all.sh e16      # 2-core CPU, protocol II at 48 bits, 64 px for 16 epochs, AdaLabelHash with centre pull (weights 1 and 2), then weight 2 and CSQ with seed 1 side by side: about 7-8 hours
#   bash benchmarks/quality/run_all.sh flip     # 2-core CPU, the e16 models (centre pull weight 2, CSQ) encoded with test-time flip; CSQ's seed 0 trained again, the reference loss at 4 and 16 epochs with and without: about 4 hours
#   bash benchmarks/quality/run_all.sh r96      # 2-core CPU, protocol II with the reference loss at 96 px for 8 epochs (the compute of 64 px for 16), encoded with and without test-time flip, then CSQ the same, then AdaLabelHash + centre pull (weight 2): about 4.5 hours
#   bash benchmarks/quality/run_all.sh b60      # 2-core CPU, protocol II at 96 px for 5 epochs (the 60-minute budget at up to 740 s per epoch; 53.6-65.5 min of training here, 579-892 s per epoch), with test-time flip: the reference loss, CSQ, AdaLabelHash + centre pull, then the last two with seed 1, then seven rows on a faster machine (128 px for one); about 11.5 hours
#   bash benchmarks/quality/run_all.sh tune2    # 2-core CPU, protocol II tuning rows (margins, lr, seeds, centre pull, a network from scratch): about 4 hours
#   bash benchmarks/quality/run_all.sh r160     # 2-core CPU, protocol I at 48 bits, 160 px for 12 epochs (and again with a second seed): about 4 hours
#   bash benchmarks/quality/run_all.sh gpu      # a CUDA machine, 224 px, protocol I then II (lent_gpu.sh: how it was run here)
# Arguments after the mode go to each compared run's run.py call (e.g. `-S train.batch_size=256`).
set -euo pipefail
cd "$(dirname "$0")/../.."
mode=${1:-cpu}
extra=("${@:2}")
run="python benchmarks/quality/run.py"
margin_075K="-S train.margin=0.75 -S train.margin_relative=true"   # frozen codewords' margin (tuning rows in results.jsonl)

# The three methods on one configuration: run.py's arguments, less --method.
three_methods() {
    $run "$@" --method adalabelhash "${extra[@]}"
    $run "$@" --method frozen $margin_075K "${extra[@]}"
    $run "$@" --method csq "${extra[@]}"
}

case "$mode" in
gpu)
    three_methods --preset gpu --protocol I --bits 48 --epochs 15 --tag gpu
    three_methods --preset gpu --protocol II --bits 48 --epochs 3 --tag gpu
    ;;
tune)
    tune="--protocol I --bits 48 --epochs 8"
    $run $tune --method adalabelhash --tag tune-m1
    for margin in 0.25 0.5 0.75; do
        name=m$(echo $margin | tr -d .)K
        if [ $margin != 0.75 ]; then
            $run $tune --method adalabelhash --tag tune-$name -S train.margin=$margin -S train.margin_relative=true
        fi
        $run $tune --method frozen --tag tune-$name -S train.margin=$margin -S train.margin_relative=true
    done
    $run $tune --method adalabelhash --tag tune-hadamard-m075K -S train.codeword_init=hadamard $margin_075K
    $run $tune --method csq --tag tune
    ;;
more)
    for bits in 16 32 64; do
        three_methods --protocol II --bits $bits --epochs 2 --tag cheap
    done
    three_methods --protocol II --bits 48 --epochs 4 --tag e4   # the headline protocol II rows, twice the epochs
    ;;
r128)
    # Protocol I at 128 px for 20 epochs: larger inputs for fewer epochs inside ~35 min of training.
    # Validation ranks against 1,000 training images instead of 5,000 (a third of a 96 px epoch
    # went to validation); it only picks the best epoch.
    three_methods --protocol I --bits 48 --epochs 20 -S train.image_size=128 -S train.val_database_size=1000 --tag r128
    ;;
r160)
    # Protocol I at 160 px for 12 epochs: at 128 px validation mAP peaked by epoch 11-12 for two of
    # the three methods while the training loss kept falling, so trade epochs for resolution.
    r160="--protocol I --bits 48 --epochs 12 -S train.image_size=160 -S train.val_database_size=1000"
    three_methods $r160 --tag r160
    # Again with training seed 1 (the split unchanged): how far one seed moves each method.
    # (Recorded in the order AdaLabelHash, CSQ, frozen; the order does not change a result.)
    three_methods $r160 -S train.seed=1 --tag r160-seed1
    ;;
e8)
    # Protocol II at 48 bits for 8 epochs (28-29 min of training each, measured): 2 -> 4 epochs had added
    # 0.04-0.06 mAP to every method with validation mAP still rising at the last epoch.
    three_methods --protocol II --bits 48 --epochs 8 --tag e8
    # AdaLabelHash with centre pull at the same 8 epochs (weights 1 and 2: the e4-pull1/e4-pull2 tuning rows).
    $run --protocol II --bits 48 --epochs 8 --method adalabelhash -S train.centre_pull=1.0 --tag e8-pull1
    $run --protocol II --bits 48 --epochs 8 --method adalabelhash -S train.centre_pull=2.0 --tag e8-pull2
    ;;
e16)
    # Protocol II at 48 bits for 16 epochs: the whole 60-minute training budget (8 epochs took 29 min).
    # AdaLabelHash was recorded in one session, the peers in the next (a session fits two of them).
    three_methods --protocol II --bits 48 --epochs 16 --tag e16
    # AdaLabelHash with its codes pulled onto their own codewords (the e4-pull1 tuning row, below).
    $run --protocol II --bits 48 --epochs 16 --method adalabelhash -S train.centre_pull=1.0 --tag e16-pull1
    # The same with weight 2, the best 4-epoch pull (e4-pull2): its codewords drew together less.
    $run --protocol II --bits 48 --epochs 16 --method adalabelhash -S train.centre_pull=2.0 --tag e16-pull2
    # Again with training seed 1, weight 2 and CSQ side by side (one thread each, started a minute
    # apart): does the 0.0015 between them hold? Each run takes ~1.6x as long as alone with two threads.
    seed1="--protocol II --bits 48 --epochs 16 -S train.seed=1 -S train.threads=1 -S train.decode_threads=1"
    $run $seed1 --method adalabelhash -S train.centre_pull=2.0 --tag e16-pull2-seed1 &
    sleep 60
    $run $seed1 --method csq --tag e16-seed1
    wait
    ;;
flip)
    # Test-time flip (convert_onnx.flip_average): each image and its mirror encoded, the mean code
    # binarised. --from-run takes the e16 runs' trained models (no training), CSQ's seed 0 is trained
    # again (its checkpoints were not kept).
    e16="--protocol II --bits 48 --epochs 16 -S convert_onnx.flip_average=true"
    pull2="--method adalabelhash -S train.centre_pull=2.0"
    $run $e16 $pull2 --from-run II-adalabelhash-48-cpu-e16-pull2 --tag e16-pull2-flip
    $run $e16 $pull2 -S train.seed=1 --from-run II-adalabelhash-48-cpu-e16-pull2-seed1 --tag e16-pull2-seed1-flip
    $run $e16 --method csq -S train.seed=1 --from-run II-csq-48-cpu-e16-seed1 --tag e16-seed1-flip
    $run $e16 --method csq --tag e16-flip
    # The reference loss (its e16 model was not kept) at 4 epochs: trained and encoded with the flip,
    # then the same model encoded in one view.
    $run --protocol II --bits 48 --epochs 4 --method adalabelhash -S convert_onnx.flip_average=true --tag e4-flip
    $run --protocol II --bits 48 --epochs 4 --method adalabelhash --from-run II-adalabelhash-48-cpu-e4-flip --tag e4-flip-oneview
    # The reference loss at 16 epochs, trained again the same way (2026-11-30).
    $run $e16 --method adalabelhash --tag e16-flip
    $run --protocol II --bits 48 --epochs 16 --method adalabelhash --from-run II-adalabelhash-48-cpu-e16-flip --tag e16-flip-oneview
    # The 4-epoch reference trained a third time, to see whether a session reproduces another's.
    $run --protocol II --bits 48 --epochs 4 --method adalabelhash --tag e4-repeat
    ;;
r96)
    # Pixels for epochs on protocol II (2026-11-30): 96 px costs ~2x the time per epoch of 64 px,
    # so 8 epochs at 96 px cost what 16 do at 64 px (the e16-flip rows).
    r96="--protocol II --bits 48 --epochs 8 -S train.image_size=96"
    flip="-S convert_onnx.flip_average=true"
    $run $r96 --method adalabelhash $flip --tag r96-e8-flip
    $run $r96 --method adalabelhash --from-run II-adalabelhash-48-cpu-r96-e8-flip --tag r96-e8-flip-oneview
    # The peer at the same input size and epochs (started 2026-11-30 at the end of a session: a run
    # stopped part-way resumes from its last epoch's checkpoint when started again).
    $run $r96 --method csq $flip --tag r96-e8-flip
    $run $r96 --method csq --from-run II-csq-48-cpu-r96-e8-flip --tag r96-e8-flip-oneview
    # AdaLabelHash + centre pull, weight 2 (not the reference loss; level with CSQ at 64 px) the same
    # way: not run yet (b60 has it side by side at 5 epochs).
    $run $r96 --method adalabelhash -S train.centre_pull=2.0 $flip --tag r96-e8-pull2-flip
    ;;
b60)
    # The 60-minute training budget on protocol II (2026-11-30): the r96 configuration with as many
    # epochs as fit in 60 min (epochs of 579-741 s on the Intel machine; the centre-pull runs' took 738-892 s there,
    # 1.17-1.21x CSQ's in either order), and its own cosine schedule over them.
    flip_48="--protocol II --bits 48 -S convert_onnx.flip_average=true"
    r96_flip="$flip_48 -S train.image_size=96"
    b60="$r96_flip --epochs 5"
    $run $b60 --method adalabelhash --tag r96-e5-flip
    # The peer and the centre-pull variant (weight 2, not the reference loss) the same way, side by side.
    $run $b60 --method csq --tag r96-e5-flip
    $run $b60 --method adalabelhash -S train.centre_pull=2.0 --tag r96-e5-pull2-flip
    # Both again with training seed 1 (the split unchanged), the centre-pull run first this time.
    $run $b60 --method adalabelhash -S train.centre_pull=2.0 -S train.seed=1 --tag r96-e5-pull2-seed1-flip
    $run $b60 --method csq -S train.seed=1 --tag r96-e5-seed1-flip
    # On a faster machine (AMD EPYC, 2 cores: 96-px epochs of about 470 s; three sessions on
    # 2026-11-30): the three methods for the 7 epochs that fit 60 min there and the centre pull
    # beside them (recorded in the order AdaLabelHash, CSQ, centre pull, frozen; the order does not
    # change a result), the centre pull and CSQ for 4 epochs (inside 60 min on either machine), and
    # the reference loss at 128 px for 4 epochs (the compute of 96 px x 7).
    three_methods $r96_flip --epochs 7 --tag r96-e7-flip
    $run $r96_flip --epochs 7 --method adalabelhash -S train.centre_pull=2.0 --tag r96-e7-pull2-flip
    $run $r96_flip --epochs 4 --method adalabelhash -S train.centre_pull=2.0 --tag r96-e4-pull2-flip
    $run $r96_flip --epochs 4 --method csq --tag r96-e4-flip
    $run $flip_48 -S train.image_size=128 --epochs 4 --method adalabelhash --tag r128-e4-flip
    ;;
tune2)
    # Protocol II at 48 bits: what might close CSQ's lead, 4 epochs each (compare with the e4 rows).
    e4="--protocol II --bits 48 --epochs 4 --method adalabelhash"
    $run $e4 $margin_075K --tag e4-m075K
    $run $e4 $margin_075K -S train.floor_negatives=false --tag e4-m075K-unfloored
    $run $e4 -S train.lr=0.001 --tag e4-lr1e-3   # the backbone's lr 3.3x (the head's stays 3e-3)
    # How far a training seed moves a 4-epoch row (the split unchanged).
    $run $e4 -S train.seed=1 --tag e4-seed1
    $run --protocol II --bits 48 --epochs 4 --method csq -S train.seed=1 --tag e4-seed1
    # The hinge plus CSQ's BCE towards each image's binarised own codeword (not the reference loss).
    $run $e4 -S train.centre_pull=1.0 --tag e4-pull1
    $run $e4 -S train.centre_pull=1.0 -S train.margin=0.25 -S train.margin_relative=true --tag e4-pull1-m025K   # and codewords kept apart?
    $run $e4 -S train.centre_pull=0.5 --tag e4-pull05   # a weaker pull
    # Hardest negative not floored at 0: a violated margin then also pushes the hardest other codeword away
    # when it already scores below 0 (floored, only the own codeword moves): do the codewords stay apart?
    $run $e4 -S train.centre_pull=1.0 -S train.floor_negatives=false --tag e4-pull1-unfloored
    $run $e4 -S train.centre_pull=2.0 --tag e4-pull2   # a stronger pull
    $run $e4 -S train.centre_pull=4.0 --tag e4-pull4
    # A ResNet-18 from scratch at 32 px (twice Lite0's images per second at 64 px). AdaLabelHash's
    # run was stopped by hand after 6 of 16 epochs: its loss sat at the margin (README).
    scratch="--protocol II --bits 48 -S train.backbone=resnet18 -S train.pretrained=false -S train.image_size=32 -S train.lr=0.001 --tag scratch-r18"
    $run $scratch --epochs 16 --method adalabelhash
    $run $scratch --epochs 12 --method csq
    ;;
cpu)
    # Headline rows, 48 bits: protocol I at 96 px for 30 epochs (~35 min of training each on an
    # idle machine), protocol II at 64 px for 2 epochs (~8 min each on 10x the images).
    three_methods --protocol I --bits 48 --epochs 30 -S train.image_size=96 --tag head
    three_methods --protocol II --bits 48 --epochs 2 --tag head
    # The other code lengths, cheaper: protocol I at 64 px for 8 epochs.
    for bits in 16 32 64; do
        three_methods --protocol I --bits $bits --epochs 8 --tag cheap
    done
    ;;
*)
    echo "usage: $0 [cpu|tune|more|r128|r160|e8|e16|flip|r96|b60|tune2|gpu]" >&2
    exit 2
    ;;
esac
