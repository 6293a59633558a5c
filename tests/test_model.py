"""Model, codewords, loss and binary codes."""

import numpy as np
import pytest
import torch

from adalabelhash.codes import binarize, check_bits, pack_bits, pack_codes, unpack_bits
from adalabelhash.errors import UserError
from adalabelhash.loss import adalabelhash_loss
from adalabelhash.model import HashModel, ModelConfig, hadamard_codewords, initial_codewords, load_model, save_model


# codes (B=2, K=2) and codewords (C=3) chosen so every score is easy to check by hand:
# S = codes @ codewords.T = [[1.5, 0.5, -1.0], [-0.5, -1.5, 1.0]]
CODES = torch.tensor([[1.0, 0.5], [-1.0, 0.5]])
CODEWORDS = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 0.0]])


def test_loss_matches_hand_computed_one_hot():
    labels = torch.tensor([[1, 0, 0], [0, 0, 1]])
    # floored (reference): hardneg = [max(0, .5, -1), max(-.5, -1.5, 0)] = [0.5, 0]
    # hinge = [2 - 1.5 + 0.5, 2 - 1 + 0] = [1, 1] -> mean over 2 positives = 1.0
    assert adalabelhash_loss(CODES, CODEWORDS, labels, margin=2.0).item() == pytest.approx(1.0)
    # unfloored: hardneg = [0.5, -0.5] -> hinge = [1, 0.5] -> 0.75
    assert adalabelhash_loss(CODES, CODEWORDS, labels, margin=2.0, floor_negatives=False).item() == pytest.approx(0.75)
    # the reference margin of 1 is already met by sample 0 (1 - 1.5 + 0.5 = 0) and sample 1 (1 - 1 + 0 = 0)
    assert adalabelhash_loss(CODES, CODEWORDS, labels, margin=1.0).item() == pytest.approx(0.0)


def test_loss_matches_hand_computed_multi_hot():
    labels = torch.tensor([[1, 1, 0]])
    codes = CODES[:1]
    # S = [1.5, 0.5, -1]; floored hardneg = max(0, 0, -1) = 0; hinges 2-1.5 = .5 and 2-.5 = 1.5 -> 2 / 2
    assert adalabelhash_loss(codes, CODEWORDS, labels, margin=2.0).item() == pytest.approx(1.0)
    # unfloored hardneg = -1: hinges max(0, -.5) = 0 and .5 -> .5 / 2
    assert adalabelhash_loss(codes, CODEWORDS, labels, margin=2.0, floor_negatives=False).item() == pytest.approx(0.25)


def test_loss_has_gradients_for_codes_and_codewords():
    codes = CODES.clone().requires_grad_()
    codewords = CODEWORDS.clone().requires_grad_()
    adalabelhash_loss(codes, codewords, torch.tensor([[1, 0, 0], [0, 0, 1]]), margin=2.0).backward()
    assert codes.grad.abs().sum() > 0 and codewords.grad.abs().sum() > 0


def test_binarize_uses_greater_equal_zero_and_packs_big_endian():
    codes = np.array([[0.0, -0.0, -1e-9, 0.3, -0.2, 0.0, 1.0, -1.0]])
    bits = binarize(codes)
    assert bits.tolist() == [[1, 1, 0, 1, 0, 1, 1, 0]]  # sign(0) would have given 0 for the zeros
    assert pack_bits(bits).tolist() == [[0b11010110]]
    assert np.array_equal(unpack_bits(pack_bits(bits)), bits)
    assert pack_codes(torch.tensor(codes)).tolist() == [[0b11010110]]


@pytest.mark.parametrize("bits", [0, 12, -8, 7.5, True])
def test_code_length_must_be_positive_multiple_of_eight(bits):
    with pytest.raises(UserError, match="multiple of 8"):
        check_bits(bits)
    if isinstance(bits, int) and not isinstance(bits, bool) and bits > 0:
        with pytest.raises(UserError, match="multiple of 8"):
            pack_bits(np.zeros((1, bits), np.uint8))


def test_uniform_init_is_reference_range_and_seeded():
    a = initial_codewords("uniform", 10, 32, seed=1)
    assert a.abs().max() <= 0.05 and a.std() > 0.01
    assert torch.equal(a, initial_codewords("uniform", 10, 32, seed=1))
    assert not torch.equal(a, initial_codewords("uniform", 10, 32, seed=2))


def test_hadamard_codewords_are_distinct_vertices_without_constant_bit():
    centres = hadamard_codewords(10, 16, torch.Generator().manual_seed(0))
    assert set(centres.unique().tolist()) == {-1.0, 1.0}
    assert len({tuple(r) for r in centres.tolist()}) == 10
    assert (centres.std(0) > 0).all(), "a bit shared by every class carries no information"
    # Hadamard rows (and negations) are at distance >= K/2 apart except the replaced column
    d = (centres[:, None, 1:] != centres[None, :, 1:]).sum(-1)
    assert d[~torch.eye(10, dtype=bool)].min() >= 7


def test_hadamard_falls_back_to_random_vertices_when_impossible():
    for classes, bits in [(10, 48), (40, 16)]:
        centres = hadamard_codewords(classes, bits, torch.Generator().manual_seed(0))
        assert centres.shape == (classes, bits) and set(centres.unique().tolist()) == {-1.0, 1.0}


def test_frozen_codewords_are_fixed_vertices_not_parameters():
    model = HashModel(ModelConfig("small_cnn", 4, 16, "hadamard", freeze_codewords=True))
    assert model.codeword_logits is None
    assert set(model.codewords().unique().tolist()) == {-1.0, 1.0}
    assert all(p is not model.fixed_codewords for p in model.parameters())
    learnable = HashModel(ModelConfig("small_cnn", 4, 16, "hadamard"))
    assert learnable.codeword_logits.requires_grad
    assert torch.equal(torch.sign(learnable.codewords()), model.codewords())


def test_forward_gives_tanh_codes_for_any_batch():
    model = HashModel(ModelConfig("small_cnn", 3, 24)).eval()
    codes = model(torch.rand(5, 3, 32, 32))
    assert codes.shape == (5, 24) and codes.abs().max() < 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"backbone": "vgg99"}, "unknown backbone 'vgg99'"),
        ({"bits": 12}, "multiple of 8"),
        ({"num_classes": 1}, "at least 2 classes"),
        ({"codeword_init": "sobol"}, "unknown codeword_init"),
        ({"freeze_codewords": True}, "freeze_codewords needs vertex codewords"),
    ],
)
def test_bad_model_config_is_one_clear_error(kwargs, message):
    config = {"backbone": "small_cnn", "num_classes": 4, "bits": 16, **kwargs}
    with pytest.raises(UserError, match=message):
        HashModel(ModelConfig(**config))


def test_model_file_round_trip(tmp_path):
    model = HashModel(ModelConfig("small_cnn", 3, 16, "random")).eval()
    save_model(tmp_path / "m.pt", model, ["a", "b", "c"], 32, extra={"note": "x"})
    loaded = load_model(tmp_path / "m.pt")
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(loaded.model(x), model(x))
    assert loaded.class_names == ["a", "b", "c"] and loaded.image_size == 32 and loaded.extra == {"note": "x"}
    (tmp_path / "bad.pt").write_bytes(b"not a model")
    with pytest.raises(UserError, match="bad.pt: not a readable model file"):
        load_model(tmp_path / "bad.pt")
    with pytest.raises(UserError, match="missing.pt: model file not found"):
        load_model(tmp_path / "missing.pt")


def test_csq_loss_matches_hand_computed_case():
    from adalabelhash.loss import csq_loss

    centres = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    codes = torch.tensor([[0.6, -0.2]])
    # class 0 -> target bits (1, 0); p = (0.8, 0.4): BCE = -(log 0.8 + log 0.6) / 2
    # quantization: ((0.6 - 1)^2 + (0.2 - 1)^2) / 2 = (0.16 + 0.64) / 2 = 0.4
    expected = -(np.log(0.8) + np.log(0.6)) / 2 + 0.5 * 0.4
    assert csq_loss(codes, centres, torch.tensor([[1, 0]]), quantization=0.5).item() == pytest.approx(expected, rel=1e-5)
    # multi-label: the sum of both centres is 0 in each bit, a tie -> +1 -> target (1, 1)
    both = -(np.log(0.8) + np.log(0.4)) / 2
    assert csq_loss(codes, centres, torch.tensor([[1, 1]]), quantization=0.0).item() == pytest.approx(both, rel=1e-5)
