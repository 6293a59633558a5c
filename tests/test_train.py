"""Training loop: learns, is reproducible, resumes exactly after a real kill, fails clearly."""

import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest
import torch

from adalabelhash.errors import UserError
from adalabelhash.train import TrainConfig, TrainData, describe_hardware, fit, load_checkpoint

FAST = TrainConfig(backbone="small_cnn", bits=16, image_size=16, lr=3e-3, epochs=4, batch_size=16, patience=0,
                   val_database_size=64, threads=1)


def weights(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_training_learns_codes_that_retrieve(tiny_train_data):
    epochs = []
    result = fit(replace(FAST, epochs=6), tiny_train_data, callbacks=(lambda e, m: epochs.append((e, m)),))
    assert [e for e, _ in epochs] == [1, 2, 3, 4, 5, 6]
    assert {"train_loss", "val_mAP", "val_codeword_accuracy", "lr"} <= set(epochs[0][1])
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    # 4 balanced classes: random codes give mAP ~0.25
    assert result.best_value > 0.8 and result.monitor == "val_mAP"
    assert result.best_value == max(m["val_mAP"] for _, m in epochs)


def test_same_seed_gives_identical_weights_on_cpu(tiny_train_data):
    a = fit(replace(FAST, epochs=2), tiny_train_data).model
    b = fit(replace(FAST, epochs=2), tiny_train_data).model
    c = fit(replace(FAST, epochs=2, seed=1), tiny_train_data).model
    assert same_weights(weights(a), weights(b))
    assert not same_weights(weights(a), weights(c))


def test_frozen_codewords_do_not_move(tiny_train_data):
    config = replace(FAST, epochs=1, codeword_init="hadamard", freeze_codewords=True, margin=0.25, margin_relative=True)
    result = fit(config, tiny_train_data)
    assert set(result.model.codewords().unique().tolist()) == {-1.0, 1.0}


def test_early_stopping_on_patience(tiny_train_data):
    result = fit(replace(FAST, epochs=30, patience=1, lr=1e-9), tiny_train_data)
    assert result.stopped_early and len(result.history) < 30


KILLED_RUN = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from conftest import synthetic_images
    from adalabelhash.train import TrainConfig, TrainData, fit

    config = TrainConfig(**{config!r})
    tx, ty = synthetic_images(4, 24, seed=0)
    vx, vy = synthetic_images(4, 6, seed=1)
    data = TrainData(tx, ty, vx, vy, ["a", "b", "c", "d"], fingerprint="synthetic-v1")

    def die(epoch, metrics):
        if epoch == 2:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no atexit: a real kill

    fit(config, data, checkpoint_dir={ckpt!r}, callbacks=(die,))
    """
)


def test_killed_run_resumes_to_the_same_weights(tiny_train_data, tmp_path):
    from dataclasses import asdict

    config = replace(FAST, epochs=4)
    uninterrupted = weights(fit(config, tiny_train_data).model)

    ckpt = tmp_path / "ckpt"
    script = KILLED_RUN.format(tests=os.path.dirname(__file__), config=asdict(config), ckpt=str(ckpt))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    (last,) = ckpt.glob("*/last.pt")
    payload = load_checkpoint(last)
    here = describe_hardware(torch.device("cpu"))
    assert payload["epoch"] == 2 and payload["hardware"] == [here]
    payload["hardware"] = ["cpu: the machine that was killed"]  # as if resumed elsewhere
    torch.save(payload, last)

    logged = []  # what a tracking callback sees: the restored epochs too
    resumed = fit(config, tiny_train_data, checkpoint_dir=ckpt, callbacks=(lambda epoch, m: logged.append((epoch, m)),))
    assert resumed.resumed_from_epoch == 2 and len(resumed.history) == 4
    assert logged == [(m["epoch"], m) for m in resumed.history] and [e for e, _ in logged] == [1, 2, 3, 4]
    assert same_weights(weights(resumed.model), uninterrupted)
    assert resumed.hardware == f"cpu: the machine that was killed, then {here}"
    # a finished run restored again trains nothing and keeps what trained it
    assert fit(config, tiny_train_data, checkpoint_dir=ckpt).hardware == resumed.hardware
    # a checkpoint written before hardware was recorded says so rather than naming this machine
    payload = load_checkpoint(last)
    del payload["hardware"]
    torch.save(payload, last)
    assert fit(config, tiny_train_data, checkpoint_dir=ckpt).hardware == "not recorded"


def test_checkpoint_from_another_configuration_is_refused(tiny_train_data, tmp_path):
    fit(replace(FAST, epochs=1), tiny_train_data, checkpoint_dir=tmp_path)
    (last,) = tmp_path.glob("*/last.pt")
    other = replace(FAST, epochs=1, bits=32).identity(tiny_train_data.fingerprint)
    with pytest.raises(UserError, match="checkpoint from another configuration"):
        load_checkpoint(last, other)
    # and a different config never picks the old checkpoint up: it trains from scratch
    result = fit(replace(FAST, epochs=1, bits=32), tiny_train_data, checkpoint_dir=tmp_path)
    assert result.resumed_from_epoch == 0 and len(list(tmp_path.glob("*/last.pt"))) == 2


def test_bad_training_input_is_one_clear_error(tiny_train_data):
    d = tiny_train_data
    with pytest.raises(UserError, match="train labels must be N x 4"):
        TrainData(d.train_images, d.train_labels[:, :3], d.val_images, d.val_labels, d.class_names, "x")
    labels = d.train_labels.clone()
    labels[:, 2] = 0
    labels[labels.sum(1) == 0, 0] = 1
    with pytest.raises(UserError, match="no training images: c"):
        TrainData(d.train_images, labels, d.val_images, d.val_labels, d.class_names, "x")
    with pytest.raises(UserError, match="uint8"):
        TrainData(d.train_images.float(), d.train_labels, d.val_images, d.val_labels, d.class_names, "x")
    with pytest.raises(UserError, match="training diverged: loss is nan"):
        fit(replace(FAST, epochs=1, optimizer="sgd", lr=1e30, head_lr=1e30), d)
    with pytest.raises(ValueError, match="epochs must be > 0"):
        replace(FAST, epochs=0)


def test_csq_peer_trains_towards_fixed_centres(tiny_train_data):
    config = replace(FAST, epochs=4, loss="csq", codeword_init="hadamard", freeze_codewords=True)
    result = fit(config, tiny_train_data)
    assert result.best_value > 0.8
    with pytest.raises(ValueError, match="set freeze_codewords: true"):
        replace(FAST, loss="csq")


def test_centre_pull_brings_codes_to_their_own_codeword(tiny_train_data):
    from adalabelhash.codes import pack_bits
    from adalabelhash.metrics import own_codeword_distance
    from adalabelhash.train import encode

    def distance_to_own_codeword(config) -> float:
        model = fit(config, tiny_train_data).model
        codes = encode(model, tiny_train_data.train_images, torch.device("cpu"))
        codewords = model.codewords().detach().numpy()
        return own_codeword_distance(pack_bits(codes >= 0), pack_bits(codewords >= 0),
                                     tiny_train_data.train_labels.numpy()).mean()

    reference = distance_to_own_codeword(replace(FAST, epochs=3))
    pulled = distance_to_own_codeword(replace(FAST, epochs=3, centre_pull=1.0))
    assert pulled < reference / 2, (pulled, reference)
    with pytest.raises(ValueError, match="only with loss adalabelhash"):
        replace(FAST, loss="csq", codeword_init="hadamard", freeze_codewords=True, centre_pull=1.0)
    with pytest.raises(ValueError, match="centre_pull must be >= 0"):
        replace(FAST, centre_pull=-1.0)
