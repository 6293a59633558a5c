"""The AdaLabelHash hinge loss (ivclab/AdaLabelHash utils/losses.py), vectorised.

scores S = codes @ codewords.T (B x C). For sample i with label vector y_i (one- or multi-hot):
    hardneg_i = max_j S_ij * (y_ij == 0)
    L = sum_{i, c: y_ic = 1} max(0, m - S_ic + hardneg_i) / sum(y)
The reference multiplies positives by 0 before the max, so the hardest negative is floored
at 0 (`floor_negatives=True`, the default): a sample whose negatives all score below 0 still
needs its positives above m. `floor_negatives=False` takes the max over negatives only.
"""

from __future__ import annotations

import torch


def adalabelhash_loss(
    codes: torch.Tensor,
    codewords: torch.Tensor,
    labels: torch.Tensor,
    margin: float = 1.0,
    floor_negatives: bool = True,
) -> torch.Tensor:
    scores = codes @ codewords.T
    return hinge_from_scores(scores, labels, margin, floor_negatives)


def hinge_from_scores(scores: torch.Tensor, labels: torch.Tensor, margin: float, floor_negatives: bool = True) -> torch.Tensor:
    positive = labels > 0
    if floor_negatives:
        hardest_negative = (scores * (~positive)).amax(dim=1)
    else:
        # A sample positive for every class has no negative: its hinge is then inactive.
        hardest_negative = scores.masked_fill(positive, float("-inf")).amax(dim=1)
        hardest_negative = torch.nan_to_num(hardest_negative, neginf=-1e9)
    hinge = torch.relu(margin - scores + hardest_negative[:, None])
    return (hinge * positive).sum() / positive.sum().clamp(min=1)


def csq_loss(codes: torch.Tensor, centres: torch.Tensor, labels: torch.Tensor, quantization: float = 1e-4) -> torch.Tensor:
    """CSQ (Yuan et al., CVPR 2020), the fixed-centre peer: BCE of (u + 1) / 2 against each image's
    hash centre in {0, 1}, plus `quantization` x mean((|u| - 1)^2).

    An image's centre is its class centre; for multi-label images, the sign of the sum of its
    classes' centres (a tied bit counts as +1, where CSQ draws a random one).
    """
    target = torch.where(labels.float() @ centres >= 0, 1.0, 0.0)
    probability = ((codes + 1) / 2).clamp(1e-6, 1 - 1e-6)
    centre_term = torch.nn.functional.binary_cross_entropy(probability, target)
    return centre_term + quantization * (codes.abs() - 1).pow(2).mean()
