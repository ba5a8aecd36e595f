import numpy as np
import pytest

from ovseg.eval import ConfusionMatrix, harmonic_iou


def test_iou_matches_a_hand_computed_confusion_matrix():
    target = np.array([[0, 0, 1], [1, 2, 255]])
    prediction = np.array([[0, 1, 1], [1, 2, 0]])
    matrix = ConfusionMatrix(3)
    matrix.update(prediction, target)
    # rows = truth, columns = prediction; the 255 pixel is ignored
    assert matrix.matrix.tolist() == [[1, 1, 0], [0, 2, 0], [0, 0, 1]]
    scores = matrix.scores()
    # class 0: TP 1, FN 1, FP 0 -> 1/2; class 1: TP 2, FP 1 -> 2/3; class 2: 1/1
    np.testing.assert_allclose(scores.per_class_iou, [50.0, 200 / 3, 100.0])
    assert scores.miou == pytest.approx((50 + 200 / 3 + 100) / 3)
    assert scores.pixel_accuracy == pytest.approx(80.0)


def test_classes_absent_from_truth_and_prediction_do_not_count():
    matrix = ConfusionMatrix(4)
    matrix.update(np.array([0, 0, 1]), np.array([0, 0, 1]))
    scores = matrix.scores()
    assert np.isnan(scores.per_class_iou[2:]).all()
    assert scores.miou == pytest.approx(100.0)


def test_a_class_only_predicted_counts_with_zero_iou():
    matrix = ConfusionMatrix(3)
    matrix.update(np.array([0, 2]), np.array([0, 0]))
    scores = matrix.scores()
    np.testing.assert_allclose(scores.per_class_iou, [50.0, np.nan, 0.0])
    assert scores.miou == pytest.approx(25.0)


def test_seen_unseen_and_harmonic_iou():
    matrix = ConfusionMatrix(4)
    # seen {0, 1}: both perfect; unseen {2, 3}: class 2 half right, class 3 never predicted
    matrix.update(np.array([0, 1, 2, 2, 2]), np.array([0, 1, 2, 3, 255]))
    scores = matrix.scores(seen=[0, 1], unseen=[2, 3])
    assert scores.seen_miou == pytest.approx(100.0)
    assert scores.unseen_miou == pytest.approx((50.0 + 0.0) / 2)
    assert scores.hiou == pytest.approx(2 * 100 * 25 / 125)
    assert scores.as_dict()["hIoU"] == pytest.approx(40.0)


def test_batches_accumulate_like_one_big_update():
    rng = np.random.default_rng(0)
    prediction = rng.integers(0, 5, size=(3, 8, 8))
    target = rng.integers(0, 5, size=(3, 8, 8))
    target[0, :2] = 255
    whole, parts = ConfusionMatrix(5), ConfusionMatrix(5)
    whole.update(prediction, target)
    for p, t in zip(prediction, target, strict=True):
        parts.update(p, t)
    assert (whole.matrix == parts.matrix).all()


def test_other_ignore_values_for_large_benchmarks():
    matrix = ConfusionMatrix(300, ignore_index=65535)
    matrix.update(np.array([255, 7]), np.array([255, 65535]))
    assert matrix.matrix[255, 255] == 1 and matrix.matrix.sum() == 1


def test_out_of_range_labels_are_an_error():
    with pytest.raises(ValueError, match="Target labels"):
        ConfusionMatrix(3).update(np.array([0]), np.array([7]))
    with pytest.raises(ValueError, match="Predicted labels"):
        ConfusionMatrix(3).update(np.array([5]), np.array([0]))


def test_harmonic_iou_of_zero():
    assert harmonic_iou(0.0, 0.0) == 0.0
    assert harmonic_iou(60.0, 40.0) == pytest.approx(48.0)
