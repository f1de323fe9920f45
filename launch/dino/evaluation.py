"""What training and ``eval_dino.py`` share: the base dataset of a config, and DINO's
weighted k-NN accuracy of features (``eval_knn.py``, T = 0.07) on a fixed memory bank
and query set (the first ``bank_size`` images, then the next ``query_size``)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .data import ImageFolder, SyntheticImages, normalize

KNN_TEMPERATURE = 0.07


def base_dataset(cfg: dict[str, Any]) -> Dataset:
    """The images of ``cfg['data']``: a folder if ``path`` is set, else the synthetic set."""
    d, size = cfg["data"], cfg["model"]["img_size"]
    if d.get("path"):
        return ImageFolder(d["path"], image_size=size)
    return SyntheticImages(d["num_samples"], size, d["num_classes"], cfg["seed"])


def eval_images(base: Dataset, ev: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised bank + query images and their labels, in order."""
    n = min(len(base), ev["bank_size"] + ev["query_size"])  # type: ignore[arg-type]
    images = torch.stack([base[i][0] for i in range(n)])
    labels = torch.tensor([int(base[i][1]) for i in range(n)])
    return normalize(images), labels


def knn_accuracy(features: torch.Tensor, labels: torch.Tensor, ev: dict[str, Any]) -> float:
    """Top-1 accuracy of the queries voted by their ``knn_k`` nearest bank features
    (cosine similarity, weights exp(sim / T)); NaN without queries."""
    nb = ev["bank_size"]
    if len(features) <= nb:
        return float("nan")
    feats = F.normalize(features.float().cpu(), dim=1)
    sim, idx = (feats[nb:] @ feats[:nb].T).topk(min(ev["knn_k"], nb), dim=1)
    votes = torch.zeros(len(feats) - nb, int(labels.max()) + 1)
    votes.scatter_add_(1, labels[:nb][idx], (sim / KNN_TEMPERATURE).exp())
    return (votes.argmax(1) == labels[nb:]).float().mean().item()
