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
