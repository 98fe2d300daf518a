"""Image-report alignment with the SigLIP pairwise sigmoid loss (after Med3DVLM).

Med3DVLM pretrains its 3D encoder contrastively against report text with
SigLIP: every image-text pair of a batch is one binary decision ("do these
belong together?") scored by ``sigmoid(t * <img, txt> + b)``, so the loss
needs no softmax over the batch and no large batches. The same two
embeddings give image-report retrieval.

Here the head sits on the frozen vision side's pooled features (the cached
features of the language stage), not on a from-scratch encoder: what is
trained is the alignment of those features with the report text, which is
what retrieval needs. Pretraining the encoder itself this way is
:mod:`tomoscribe.train_siglip`.

::

    image: low (B, N_low, C3), high (B, N_high, C4), regions (B, organs, R)
       -> mean over tokens of low and high, regions flattened -> MLP -> (B, dim)
    text:  token ids (B, L) -> own embedding table, mean over words -> MLP -> (B, dim)
    both L2-normalised; logits = exp(t) <img, txt> + b      (B, B)
    loss = -mean log sigmoid(label * logits), label +1 where the two reports
    are the same text, -1 elsewhere (phantoms share report texts: a normal
    study's text is the same for all)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class AlignmentHead(nn.Module):
    """Image and report embeddings in one space, trained with the SigLIP loss.

    Args:
        low_channels, high_channels: channels of the two pooled encoder streams.
        region_features: features per organ of the region pooling.
        organs: organ tokens.
        vocab: report vocabulary size.
        dim: embedding width.
    """

    def __init__(self, low_channels: int, high_channels: int, region_features: int,
                 organs: int, vocab: int, dim: int = 64) -> None:
        super().__init__()
        image_in = low_channels + high_channels + organs * region_features
        self.image = nn.Sequential(nn.LayerNorm(image_in), nn.Linear(image_in, 2 * dim),
                                   nn.GELU(), nn.Linear(2 * dim, dim))
        self.words = nn.Embedding(vocab, dim, padding_idx=0)
        self.text = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        # SigLIP's initialisation: temperature 10, bias -10 (few positives per row)
        self.log_t = nn.Parameter(torch.tensor(math.log(10.0)))
        self.bias = nn.Parameter(torch.tensor(-10.0))

    def embed_image(self, low: torch.Tensor, high: torch.Tensor,
                    regions: torch.Tensor) -> torch.Tensor:
        """Unit image embeddings ``(B, dim)`` from the pooled features."""
        x = torch.cat([low.mean(dim=1), high.mean(dim=1), regions.flatten(1)], dim=1)
        return F.normalize(self.image(x), dim=-1)

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        """Unit report embeddings ``(B, dim)`` from token ids ``(B, L)`` (pad 0)."""
        keep = (ids != 0).unsqueeze(-1).float()
        mean = (self.words(ids) * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)
        return F.normalize(self.text(mean), dim=-1)

    def loss(self, image: torch.Tensor, text: torch.Tensor,
             same: torch.Tensor) -> torch.Tensor:
        """SigLIP loss of unit embeddings ``(B, dim)`` each; ``same`` ``(B, B)`` bool."""
        return siglip_loss(image, text, same, self.log_t, self.bias)


def siglip_loss(image: torch.Tensor, text: torch.Tensor, same: torch.Tensor,
                log_t: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The pairwise sigmoid loss.

    Args:
        image, text: unit embeddings ``(B, dim)``.
        same: ``(B, B)`` bool, True where image ``i`` and text ``j`` belong together.
        log_t, bias: the learned log temperature and bias (scalars).

    Returns:
        ``-sum log sigmoid(label * (exp(log_t) <img_i, txt_j> + bias)) / B``,
        label +1 for pairs that belong together, -1 otherwise.
    """
    logits = log_t.exp() * image @ text.T + bias
    labels = same.float() * 2 - 1
    return -F.logsigmoid(labels * logits).sum() / image.shape[0]


def recall_at(image: torch.Tensor, gallery: torch.Tensor, truth: torch.Tensor,
              ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """Image-to-report recall@k over a gallery of distinct report texts.

    Args:
        image: ``(N, dim)`` unit image embeddings of the studies.
        gallery: ``(U, dim)`` unit embeddings of the distinct report texts.
        truth: ``(N,)`` index into the gallery of each study's own text.

    Returns:
        ``{k: share of studies whose own text is among the k best}``.
    """
    order = (image @ gallery.T).argsort(dim=1, descending=True)
    return {k: float((order[:, :k] == truth[:, None]).any(dim=1).float().mean()) for k in ks}
