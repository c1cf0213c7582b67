import numpy as np
import pytest

from rlhf_jax.labelers import GoldSentimentScorer, ranks_from_wins, simulated_ranks


def test_ranks_from_wins_hand_case():
    np.testing.assert_array_equal(ranks_from_wins(np.array([[3, 1, 1, 0], [0, 2, 2, 2]])),
                                  [[0, 1, 1, 2], [1, 0, 0, 0]])


def test_noiseless_labeler_follows_gold_order():
    gold = np.array([[0.3, -1.0, 2.0, 0.5]])
    ranks = simulated_ranks(gold, 0.0, np.random.default_rng(0))
    np.testing.assert_array_equal(ranks, [[2, 3, 0, 1]])


def test_pairwise_labels_follow_bradley_terry():
    # K=2: the better response wins with probability σ(Δ/τ); check the frequency over many prompts.
    n, delta, tau = 20000, 1.0, 0.5
    gold = np.tile([[delta, 0.0]], (n, 1))
    ranks = simulated_ranks(gold, tau, np.random.default_rng(1))
    p_hat = np.mean(ranks[:, 0] < ranks[:, 1])
    p = 1 / (1 + np.exp(-delta / tau))
    assert abs(p_hat - p) < 4 * np.sqrt(p * (1 - p) / n)


def test_gold_scorer_learns_sentiment_words():
    pos = ["a wonderful , moving film", "great acting and a great story", "loved it , excellent"]
    neg = ["a terrible , boring film", "awful acting and a dull story", "hated it , worst ever"]
    texts, labels = (pos + neg) * 5, ([1] * 3 + [0] * 3) * 5
    scorer = GoldSentimentScorer.fit(texts, labels)
    assert scorer.accuracy(texts, labels) == 1.0
    p = scorer.prob(["great , wonderful story", "boring , awful , terrible"])
    assert p[0] > 0.5 > p[1]
    with pytest.raises(ValueError, match="0/1 label"):
        GoldSentimentScorer.fit(["a", "b"], [1, 2])
