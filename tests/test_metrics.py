"""graphc.metrics against scikit-learn, on random data and on the edge cases."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graphc.metrics import (MetricError, accuracy, auc, classification_report, confusion_matrix,
                            precision_recall_f1, roc_auc, roc_curve)

skm = pytest.importorskip("sklearn.metrics")

SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def label_pairs(draw, min_size=1, max_size=40):
    """(y_true, y_pred, K): labels below K, where some classes may never be predicted."""
    k = draw(st.integers(1, 6))
    n = draw(st.integers(min_size, max_size))
    labels = st.lists(st.integers(0, k - 1), min_size=n, max_size=n)
    return np.array(draw(labels)), np.array(draw(labels)), k


@st.composite
def binary_scores(draw):
    """(y_true, scores) with both classes present and scores from a few levels (many ties)."""
    n = draw(st.integers(2, 40))
    y = draw(st.lists(st.integers(0, 1), min_size=n, max_size=n).filter(lambda v: 0 < sum(v) < n))
    levels = draw(st.integers(1, 8))
    scores = draw(st.lists(st.integers(0, levels - 1), min_size=n, max_size=n))
    return np.array(y), np.array(scores) / levels


# --------------------------------------------------------------------------- labels

@SETTINGS
@given(label_pairs())
@pytest.mark.filterwarnings("ignore:A single label was found:UserWarning")
def test_accuracy_and_confusion_matrix_match_sklearn(pair):
    y_true, y_pred, k = pair
    assert accuracy(y_true, y_pred) == pytest.approx(skm.accuracy_score(y_true, y_pred))
    expected = skm.confusion_matrix(y_true, y_pred, labels=np.arange(k))
    np.testing.assert_array_equal(confusion_matrix(y_true, y_pred, num_classes=k), expected)
    seen = max(y_true.max(), y_pred.max()) + 1
    np.testing.assert_array_equal(confusion_matrix(y_true, y_pred), expected[:seen, :seen])


@SETTINGS
@given(label_pairs(), st.sampled_from(["macro", "micro", "weighted", None]))
def test_precision_recall_f1_match_sklearn(pair, average):
    y_true, y_pred, k = pair
    for num_classes, labels in ((None, None), (k, np.arange(k))):
        ours = precision_recall_f1(y_true, y_pred, average=average, num_classes=num_classes)
        p, r, f, _ = skm.precision_recall_fscore_support(y_true, y_pred, average=average,
                                                         labels=labels, zero_division=0)
        for got, want in zip(ours, (p, r, f)):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_class_never_predicted_counts_as_zero_precision():
    y_true, y_pred = np.array([0, 1, 2, 2]), np.array([0, 0, 0, 1])
    p, r, f = precision_recall_f1(y_true, y_pred, average=None)
    np.testing.assert_allclose(p, [1 / 3, 0, 0])
    np.testing.assert_allclose(r, [1, 0, 0])
    np.testing.assert_allclose(f, [0.5, 0, 0])
    assert precision_recall_f1(y_true, y_pred, average="macro") == pytest.approx(
        (1 / 9, 1 / 3, 1 / 6))
    # a class in neither array still counts in the macro mean once num_classes names it
    assert precision_recall_f1(y_true, y_pred, num_classes=4)[1] == pytest.approx(1 / 4)


def test_micro_average_is_accuracy():
    rng = np.random.default_rng(3)
    y_true, y_pred = rng.integers(0, 5, 200), rng.integers(0, 5, 200)
    assert precision_recall_f1(y_true, y_pred, "micro") == pytest.approx(
        (accuracy(y_true, y_pred),) * 3)


def test_label_metric_errors():
    with pytest.raises(MetricError, match="differ in length"):
        accuracy([0, 1], [0])
    with pytest.raises(MetricError, match="integer class labels"):
        accuracy(np.array([0.5]), np.array([0.5]))
    with pytest.raises(MetricError, match="empty"):
        accuracy([], [])
    with pytest.raises(MetricError, match="num_classes=2"):
        confusion_matrix([0, 2], [0, 1], num_classes=2)
    with pytest.raises(MetricError, match="non-negative"):
        confusion_matrix([0, -1], [0, 1])
    with pytest.raises(MetricError, match="average"):
        precision_recall_f1([0], [0], average="samples")
    with pytest.raises(MetricError, match=r"\[3\] do not fit"):
        precision_recall_f1([0, 3], [0, 1], num_classes=3)


# --------------------------------------------------------------------------- ROC

@SETTINGS
@given(binary_scores())
def test_roc_curve_matches_sklearn_with_ties(data):
    y, scores = data
    fpr, tpr, thresholds = roc_curve(y, scores)
    want_fpr, want_tpr, want_thresholds = skm.roc_curve(y, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, want_fpr)
    np.testing.assert_allclose(tpr, want_tpr)
    np.testing.assert_array_equal(thresholds, want_thresholds)


@SETTINGS
@given(binary_scores())
def test_binary_roc_auc_matches_sklearn(data):
    y, scores = data
    assert roc_auc(y, scores) == pytest.approx(skm.roc_auc_score(y, scores), abs=1e-12)


def test_roc_curve_all_tied_scores_is_the_diagonal():
    fpr, tpr, thresholds = roc_curve([0, 1, 0, 1], [0.3, 0.3, 0.3, 0.3])
    np.testing.assert_array_equal(fpr, [0, 1])
    np.testing.assert_array_equal(tpr, [0, 1])
    np.testing.assert_array_equal(thresholds, [np.inf, 0.3])
    assert auc(fpr, tpr) == 0.5


def test_perfect_and_inverted_rankings():
    y = np.array([0, 0, 1, 1])
    assert roc_auc(y, [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert roc_auc(y, [0.9, 0.8, 0.2, 0.1]) == 0.0


def softmax(logits):
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@SETTINGS
@given(st.integers(3, 6), st.integers(0, 2**32 - 1), st.booleans())
def test_one_vs_rest_roc_auc_matches_sklearn(k, seed, coarse):
    rng = np.random.default_rng(seed)
    n = 30
    y = np.r_[np.arange(k), rng.integers(0, k, n - k)]  # every class occurs
    logits = rng.integers(0, 3, (n, k)) if coarse else rng.standard_normal((n, k))  # coarse: ties
    probs = softmax(logits.astype(np.float64))
    want = skm.roc_auc_score(y, probs, multi_class="ovr", average="macro")
    assert roc_auc(y, probs) == pytest.approx(want, abs=1e-12)


@SETTINGS
@given(st.lists(st.floats(-10, 10), min_size=2, max_size=20), st.booleans())
def test_auc_matches_sklearn_increasing_and_decreasing(ys, decreasing):
    x = np.cumsum(np.abs(np.random.default_rng(len(ys)).standard_normal(len(ys))))
    if decreasing:
        x = x[::-1]
    assert auc(x, ys) == pytest.approx(skm.auc(x, ys), abs=1e-9)


def test_roc_errors():
    with pytest.raises(MetricError, match="both classes"):
        roc_curve([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(MetricError, match="binary"):
        roc_curve([0, 2], [0.1, 0.2])
    with pytest.raises(MetricError, match="finite"):
        roc_curve([0, 1], [0.1, np.nan])
    with pytest.raises(MetricError, match="monotonic"):
        auc([0, 2, 1], [0, 1, 1])
    with pytest.raises(MetricError, match="ovr"):
        roc_auc([0, 1], [0.2, 0.4], multi_class="ovo")
    with pytest.raises(MetricError, match="below K = 2"):
        roc_auc([0, 2], np.ones((2, 2)))
    with pytest.raises(MetricError, match=r"class\(es\) \[2\]"):
        roc_auc([0, 1, 0], softmax(np.eye(3)))


# --------------------------------------------------------------------------- report

def report_cells(report: str) -> list[list[str | float]]:
    """The report's words, numbers as floats (scikit-learn sometimes prints a support as 1.0)."""
    def cell(word):
        try:
            return float(word)
        except ValueError:
            return word
    return [[cell(w) for w in line.split()] for line in report.splitlines()]


@settings(max_examples=20, deadline=None)
@given(label_pairs(), st.sampled_from([2, 4]))
def test_classification_report_matches_sklearn(pair, digits):
    y_true, y_pred, _ = pair
    expected = skm.classification_report(y_true, y_pred, digits=digits, zero_division=0)
    assert report_cells(classification_report(y_true, y_pred, digits=digits)) == \
        report_cells(expected)


def test_classification_report_layout_is_sklearns():
    y_true, y_pred = [0, 1, 2, 2, 11, 2], [0, 2, 2, 1, 3, 2]
    report = classification_report(y_true, y_pred, digits=3)
    assert report == skm.classification_report(y_true, y_pred, digits=3, zero_division=0)
    lines = report.splitlines()
    assert lines[0].split() == ["precision", "recall", "f1-score", "support"]
    assert lines[2].split() == ["0", "1.000", "1.000", "1.000", "1"]
    assert lines[-3].split() == ["accuracy", "0.500", "6"]


def test_classification_report_names_boolean_labels_as_sklearn():
    """Boolean labels were printed as 0 and 1; scikit-learn prints False and True."""
    y_true, y_pred = np.array([True, False, True, True]), np.array([True, False, False, True])
    assert classification_report(y_true, y_pred) == \
        skm.classification_report(y_true, y_pred, zero_division=0)
