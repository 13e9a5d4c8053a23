"""Clustering metrics, scikit-learn style ``(labels_true, labels_pred)``.

Inputs may be numpy arrays, torch tensors (any device) or sequences; results are python
``float`` / ``int``. Label values need not be ``0..K-1``: accuracies compare labels by identity.

The three accuracies differ in how clusters are mapped to classes, and the papers this package
reproduces each report a different one:

* :func:`cluster_acc_hungarian`: one-to-one matching (the DEC / VaDE protocol);
* :func:`cluster_acc_majority`: many-to-one, each cluster takes its majority class (Rui Shu's
  GMVAE write-up and code);
* :func:`cluster_acc_aae`: many-to-one, each cluster takes the class of its single most
  confident point (Makhzani et al. 2015, used by Dilokthanakul et al. 2016).

For the same predictions, Hungarian <= majority always holds; AAE can fall on either side.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.special import entr
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.metrics.cluster import contingency_matrix

_ROW_SUM_TOL = 1e-3


def _to_numpy(a, what) -> np.ndarray:
    if hasattr(a, "detach"):  # torch.Tensor, without importing torch here
        a = a.detach().cpu().numpy()
    a = np.asarray(a)
    if a.size == 0:
        raise ValueError(f"{what} is empty")
    return a


def _labels(a, what) -> np.ndarray:
    a = _to_numpy(a, what)
    if a.ndim != 1:
        raise ValueError(f"{what} must be 1-D, got shape {a.shape}")
    return a


def _label_pair(labels_true, labels_pred):
    t = _labels(labels_true, "labels_true")
    p = _labels(labels_pred, "labels_pred")
    if len(t) != len(p):
        raise ValueError(f"labels_true has {len(t)} entries but labels_pred has {len(p)}")
    return t, p


def _probs(cluster_probs) -> np.ndarray:
    q = _to_numpy(cluster_probs, "cluster_probs")
    if q.ndim != 2:
        raise ValueError(f"cluster_probs must be 2-D (N, K), got shape {q.shape}")
    q = q.astype(np.float64)
    if not np.isfinite(q).all():
        raise ValueError("cluster_probs contains NaN or infinite values")
    if (q < -_ROW_SUM_TOL).any():
        raise ValueError(f"cluster_probs has negative entries (min {q.min():.3g})")
    sums = q.sum(axis=1)
    worst = np.abs(sums - 1.0).max()
    if worst > _ROW_SUM_TOL:
        raise ValueError(
            f"cluster_probs rows must sum to 1 (tolerance {_ROW_SUM_TOL}); worst row sums to "
            f"{sums[np.argmax(np.abs(sums - 1.0))]:.6g}"
        )
    return q


def _probs_and_labels(labels_true, cluster_probs):
    t = _labels(labels_true, "labels_true")
    q = _probs(cluster_probs)
    if len(t) != len(q):
        raise ValueError(f"labels_true has {len(t)} entries but cluster_probs has {len(q)} rows")
    return t, q


def _counts(t, p) -> np.ndarray:
    """(distinct predicted clusters, distinct true classes) contingency matrix."""
    return contingency_matrix(t, p).T


def cluster_acc_hungarian(labels_true, labels_pred) -> float:
    """Accuracy under the best one-to-one map from clusters to classes.

    The map maximises the matched counts of the contingency matrix
    (``scipy.optimize.linear_sum_assignment``); this is the unsupervised clustering accuracy of
    DEC (Xie et al. 2016) and VaDE (Jiang et al. 2017). With more clusters than classes the
    unmatched clusters count as wrong (and vice versa).
    """
    t, p = _label_pair(labels_true, labels_pred)
    c = _counts(t, p)
    rows, cols = linear_sum_assignment(c, maximize=True)
    return float(c[rows, cols].sum() / len(t))


def cluster_acc_majority(labels_true, labels_pred) -> float:
    """Accuracy when every cluster is labelled with its majority true class.

    Several clusters may share a class. This is the metric of Rui Shu's GMVAE blog post and
    code ("Gaussian Mixture VAE: Lessons in Variational Inference, Generative Models, and Deep
    Nets", 2016).
    """
    t, p = _label_pair(labels_true, labels_pred)
    return float(_counts(t, p).max(axis=1).sum() / len(t))


def cluster_acc_aae(labels_true, cluster_probs) -> float:
    """Accuracy under the AAE cluster-labelling criterion.

    Each point goes to its argmax cluster. For every cluster ``k`` the point (over *all* points)
    with the highest ``cluster_probs[:, k]`` lends its true label to every point assigned to
    ``k``. From the unsupervised clustering section of Makhzani et al. 2015 ("Adversarial
    Autoencoders"); the metric of Dilokthanakul et al. 2016 ("Deep Unsupervised Clustering
    with Gaussian Mixture Variational Autoencoders").
    """
    t, q = _probs_and_labels(labels_true, cluster_probs)
    assigned = q.argmax(axis=1)
    cluster_label = t[q.argmax(axis=0)]  # (K,): label of each cluster's most confident point
    return float(np.mean(cluster_label[assigned] == t))


def nmi(labels_true, labels_pred, average_method="arithmetic") -> float:
    """Normalised mutual information, ``sklearn.metrics.normalized_mutual_info_score``.

    ``average_method="arithmetic"`` is scikit-learn's default; older work (DEC era) often used
    ``"geometric"`` (scikit-learn's default before 0.22).
    """
    t, p = _label_pair(labels_true, labels_pred)
    return float(normalized_mutual_info_score(t, p, average_method=average_method))


def ari(labels_true, labels_pred) -> float:
    """Adjusted Rand index, ``sklearn.metrics.adjusted_rand_score``."""
    t, p = _label_pair(labels_true, labels_pred)
    return float(adjusted_rand_score(t, p))


def conditional_entropy(cluster_probs) -> float:
    """``H(Y|X)``: mean over points of the entropy (nats) of each row of ``cluster_probs``.

    0 for confident (one-hot) posteriors, ``log K`` for collapsed (uniform) ones.
    """
    q = np.clip(_probs(cluster_probs), 0.0, None)
    return float(entr(q).sum(axis=1).mean())


def usage_entropy(cluster_probs) -> float:
    """Entropy (nats) of the mean row of ``cluster_probs``, i.e. of the marginal cluster usage.

    ``log K`` when all ``K`` clusters are used equally, 0 when one cluster takes everything.
    """
    q = np.clip(_probs(cluster_probs), 0.0, None)
    return float(entr(q.mean(axis=0)).sum())


def clusters_used(labels_pred, min_fraction=0.0) -> int:
    """The number of clusters holding more than ``min_fraction`` of the points.

    With ``min_fraction=0`` this is the number of distinct predicted labels.
    """
    p = _labels(labels_pred, "labels_pred")
    if not 0.0 <= min_fraction < 1.0:
        raise ValueError(f"min_fraction must be in [0, 1), got {min_fraction}")
    _, counts = np.unique(p, return_counts=True)
    return int((counts / len(p) > min_fraction).sum())


def contingency(labels_true, labels_pred, n_clusters=None, n_classes=None) -> np.ndarray:
    """``(n_clusters, n_classes)`` int64 counts: entry ``[k, c]`` = points of class ``c`` put
    in cluster ``k``.

    Labels are used as row / column indices, so they must be non-negative integers; the sizes
    default to ``max + 1`` so that empty clusters still get a (zero) row in a plot.
    """
    t, p = _label_pair(labels_true, labels_pred)
    for a, what in ((t, "labels_true"), (p, "labels_pred")):
        if not np.issubdtype(a.dtype, np.integer) or a.min() < 0:
            raise ValueError(f"{what} must be non-negative integers for contingency()")
    n_clusters = int(p.max()) + 1 if n_clusters is None else int(n_clusters)
    n_classes = int(t.max()) + 1 if n_classes is None else int(n_classes)
    if p.max() >= n_clusters or t.max() >= n_classes:
        raise ValueError(
            f"labels exceed the requested shape ({n_clusters}, {n_classes}): "
            f"max cluster {p.max()}, max class {t.max()}"
        )
    c = np.zeros((n_clusters, n_classes), dtype=np.int64)
    np.add.at(c, (p, t), 1)
    return c


def clustering_report(labels_true, cluster_probs) -> dict:
    """All metrics for ``(N, K)`` cluster posteriors; hard assignments are the row argmax.

    Keys: ``acc_hungarian``, ``acc_majority``, ``acc_aae``, ``nmi``, ``ari``, ``cond_entropy``,
    ``usage_entropy``, ``clusters_used``; without labels (``labels_true`` None) only the last
    three, which need none.
    """
    if labels_true is None:
        q = _probs(cluster_probs)
        return {"cond_entropy": conditional_entropy(q), "usage_entropy": usage_entropy(q),
                "clusters_used": clusters_used(q.argmax(axis=1))}  # fmt: skip
    t, q = _probs_and_labels(labels_true, cluster_probs)
    pred = q.argmax(axis=1)
    return {
        "acc_hungarian": cluster_acc_hungarian(t, pred),
        "acc_majority": cluster_acc_majority(t, pred),
        "acc_aae": cluster_acc_aae(t, q),
        "nmi": nmi(t, pred),
        "ari": ari(t, pred),
        "cond_entropy": conditional_entropy(q),
        "usage_entropy": usage_entropy(q),
        "clusters_used": clusters_used(pred),
    }
