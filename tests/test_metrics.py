import math

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from pyro_gmvae import metrics as M


def one_hot(labels, k):
    q = np.zeros((len(labels), k))
    q[np.arange(len(labels)), labels] = 1.0
    return q


TRUE = np.array([0, 0, 1, 1, 2, 2, 2, 3, 3, 3])


# --------------------------------------------------------------------------- accuracies


def test_perfect_labelling_scores_one_on_all_accuracies():
    q = one_hot(TRUE, 4)
    assert M.cluster_acc_hungarian(TRUE, TRUE) == 1.0
    assert M.cluster_acc_majority(TRUE, TRUE) == 1.0
    assert M.cluster_acc_aae(TRUE, q) == 1.0


def test_permuted_labelling_scores_one():
    perm = np.array([2, 3, 0, 1])
    pred = perm[TRUE]
    assert M.cluster_acc_hungarian(TRUE, pred) == 1.0
    assert M.cluster_acc_majority(TRUE, pred) == 1.0
    assert M.cluster_acc_aae(TRUE, one_hot(pred, 4)) == 1.0
    assert M.nmi(TRUE, pred) == pytest.approx(1.0)
    assert M.ari(TRUE, pred) == pytest.approx(1.0)


def test_hungarian_below_majority_hand_computed():
    # Contingency (rows = clusters, cols = classes):
    #   cluster 0: class 0 x3
    #   cluster 1: class 0 x2, class 1 x1
    #   cluster 2: class 1 x2
    # Majority: 3 + 2 + 2 = 7 of 8.  One-to-one: best is c0->0, c2->1 = 3 + 2 = 5 of 8
    # (c0->0, c1->1 gives 4; c1->0, c2->1 gives 4); cluster 1 stays unmatched.
    true = [0, 0, 0, 0, 0, 1, 1, 1]
    pred = [0, 0, 0, 1, 1, 1, 2, 2]
    assert M.cluster_acc_majority(true, pred) == 7 / 8
    assert M.cluster_acc_hungarian(true, pred) == 5 / 8


def test_two_clusters_one_class():
    # Two clusters holding class 0: majority is perfect, one-to-one loses one of them.
    true = [0, 0, 0, 0, 1, 1]
    pred = [0, 0, 1, 1, 2, 2]
    assert M.cluster_acc_majority(true, pred) == 1.0
    assert M.cluster_acc_hungarian(true, pred) == 4 / 6


def test_fewer_clusters_than_classes():
    # Everything in one cluster: one-to-one and majority both credit only the biggest class.
    true = [0, 1, 1, 2, 2, 2]
    pred = [5, 5, 5, 5, 5, 5]
    assert M.cluster_acc_hungarian(true, pred) == 3 / 6
    assert M.cluster_acc_majority(true, pred) == 3 / 6


@pytest.mark.parametrize("n_clusters", [3, 10, 30])
def test_hungarian_never_exceeds_majority(n_clusters):
    for seed in range(40):
        rng = np.random.default_rng(seed)
        true = rng.integers(0, 10, size=200)
        # Correlate the prediction with the truth a bit, so both accuracies are non-trivial.
        pred = np.where(rng.random(200) < 0.5, true % n_clusters, rng.integers(0, n_clusters, 200))
        h = M.cluster_acc_hungarian(true, pred)
        m = M.cluster_acc_majority(true, pred)
        assert 0.0 < h <= m + 1e-12 <= 1.0 + 1e-12


def test_aae_uses_single_most_confident_point():
    # Cluster 0 holds points 0-3 (three of class 0, one of class 1); its most confident point
    # is point 3 (q=0.95), of class 1, so the whole cluster is labelled 1 despite its majority.
    # Cluster 1's most confident point is point 4 (class 1). Correct: points 3 and 4 -> 2/5.
    true = [0, 0, 0, 1, 1]
    q = [[0.6, 0.4], [0.7, 0.3], [0.8, 0.2], [0.95, 0.05], [0.1, 0.9]]
    assert M.cluster_acc_aae(true, q) == pytest.approx(2 / 5)
    assert M.cluster_acc_majority(true, np.argmax(q, axis=1)) == pytest.approx(4 / 5)


def test_aae_searches_all_points_not_just_members():
    # Cluster 0's highest q[:, 0] (0.40) belongs to point A, which is assigned to cluster 2;
    # A's class (2) therefore labels cluster 0, making its only member C (class 0) wrong.
    true = [2, 0, 1]  # A, C, D
    q = [[0.40, 0.00, 0.60], [0.38, 0.31, 0.31], [0.10, 0.90, 0.00]]
    assert M.cluster_acc_aae(true, q) == pytest.approx(2 / 3)
    assert M.cluster_acc_majority(true, np.argmax(q, axis=1)) == 1.0


def test_accept_torch_and_return_python_types():
    t = torch.tensor(TRUE)
    q = torch.tensor(one_hot(TRUE, 4), dtype=torch.float32)
    for value in (
        M.cluster_acc_hungarian(t, t),
        M.cluster_acc_majority(t, t),
        M.cluster_acc_aae(t, q),
        M.nmi(t, t),
        M.ari(t, t),
        M.conditional_entropy(q),
        M.usage_entropy(q),
    ):
        assert type(value) is float
    assert type(M.clusters_used(t)) is int


def test_arbitrary_label_values():
    true = np.array(["a", "a", "b", "b"])
    pred = np.array([7, 7, -1, -1])
    assert M.cluster_acc_hungarian(true, pred) == 1.0
    assert M.cluster_acc_majority(true, pred) == 1.0


# --------------------------------------------------------------------------- nmi / ari


def test_nmi_ari_match_sklearn():
    rng = np.random.default_rng(0)
    true = rng.integers(0, 10, 500)
    pred = np.where(rng.random(500) < 0.6, true, rng.integers(0, 12, 500))
    assert M.nmi(true, pred) == pytest.approx(normalized_mutual_info_score(true, pred))
    assert M.ari(true, pred) == pytest.approx(adjusted_rand_score(true, pred))
    assert M.nmi(true, pred, average_method="geometric") == pytest.approx(
        normalized_mutual_info_score(true, pred, average_method="geometric")
    )
    assert 0.0 < M.nmi(true, pred) < 1.0


# --------------------------------------------------------------------------- entropies, usage


@pytest.mark.parametrize("k", [2, 10, 50])
def test_conditional_entropy_extremes(k):
    assert M.conditional_entropy(np.full((7, k), 1.0 / k)) == pytest.approx(math.log(k))
    assert M.conditional_entropy(one_hot(np.arange(7) % k, k)) == 0.0


def test_conditional_entropy_hand_value():
    q = [[0.5, 0.5], [1.0, 0.0]]
    assert M.conditional_entropy(q) == pytest.approx(0.5 * math.log(2))


@pytest.mark.parametrize("k", [2, 10])
def test_usage_entropy(k):
    balanced = one_hot(np.arange(5 * k) % k, k)
    assert M.usage_entropy(balanced) == pytest.approx(math.log(k))
    collapsed = one_hot(np.zeros(20, dtype=int), k)
    assert M.usage_entropy(collapsed) == 0.0
    # Uniform rows use all clusters equally on average even though no point is confident.
    assert M.usage_entropy(np.full((4, k), 1.0 / k)) == pytest.approx(math.log(k))


def test_clusters_used():
    pred = [0] * 90 + [1] * 8 + [2] * 2
    assert M.clusters_used(pred) == 3
    assert M.clusters_used(pred, min_fraction=0.05) == 2
    assert M.clusters_used(pred, min_fraction=0.5) == 1
    with pytest.raises(ValueError, match="min_fraction"):
        M.clusters_used(pred, min_fraction=1.0)


def test_contingency():
    true = [0, 0, 1, 2, 2, 2]
    pred = [1, 1, 1, 0, 0, 3]
    c = M.contingency(true, pred)
    expected = np.array([[0, 0, 2], [2, 1, 0], [0, 0, 0], [0, 0, 1]])
    np.testing.assert_array_equal(c, expected)
    assert M.contingency(true, pred, n_clusters=6, n_classes=10).shape == (6, 10)
    assert M.contingency(true, pred, n_clusters=6, n_classes=10).sum() == 6
    with pytest.raises(ValueError, match="exceed"):
        M.contingency(true, pred, n_clusters=2)
    with pytest.raises(ValueError, match="non-negative integers"):
        M.contingency(true, [-1, 0, 0, 0, 0, 0])


def test_clustering_report():
    true = [0, 0, 0, 1, 1]
    q = np.array([[0.6, 0.4], [0.7, 0.3], [0.8, 0.2], [0.95, 0.05], [0.1, 0.9]])
    r = M.clustering_report(true, q)
    assert set(r) == {
        "acc_hungarian",
        "acc_majority",
        "acc_aae",
        "nmi",
        "ari",
        "cond_entropy",
        "usage_entropy",
        "clusters_used",
    }
    assert r["acc_hungarian"] == pytest.approx(4 / 5)
    assert r["acc_majority"] == pytest.approx(4 / 5)
    assert r["acc_aae"] == pytest.approx(2 / 5)
    assert r["clusters_used"] == 2
    assert r["cond_entropy"] == pytest.approx(M.conditional_entropy(q))
    assert all(type(v) is float for k, v in r.items() if k != "clusters_used")


# --------------------------------------------------------------------------- input checks


def test_errors_on_bad_input():
    with pytest.raises(ValueError, match="3 entries but labels_pred has 2"):
        M.cluster_acc_hungarian([0, 1, 2], [0, 1])
    with pytest.raises(ValueError, match="3 rows"):
        M.cluster_acc_aae([0, 1], np.eye(3))
    with pytest.raises(ValueError, match="empty"):
        M.cluster_acc_majority([], [])
    with pytest.raises(ValueError, match="empty"):
        M.conditional_entropy(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="2-D"):
        M.conditional_entropy([0.5, 0.5])
    with pytest.raises(ValueError, match="1-D"):
        M.nmi([[0, 1]], [[0, 1]])
    with pytest.raises(ValueError, match="NaN"):
        M.usage_entropy([[0.5, float("nan")]])
    with pytest.raises(ValueError, match="sum to 1"):
        M.cluster_acc_aae([0], [[0.5, 0.49]])
    with pytest.raises(ValueError, match="negative"):
        M.conditional_entropy([[1.5, -0.5]])
    with pytest.raises(ValueError, match="sum to 1"):
        M.clustering_report([0, 1], [[0.2, 0.2], [0.5, 0.5]])
    # Within the 1e-3 tolerance is accepted (float32 softmax outputs).
    assert M.conditional_entropy([[0.5, 0.5005]]) > 0
