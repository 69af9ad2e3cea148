"""datasets/labels.py: label conventions, training classes and nested regions, hand-computed."""
import numpy as np
import pytest
import torch

from datasets.labels import (classes_to_labels, classes_to_regions, classes_to_regions_batch, detect_convention,
                             labels_to_classes, logits_to_probabilities, output_channels,
                             probabilities_to_classes, region_masks, regions_to_classes)

# one voxel per class: background, NCR, ED, ET
CLASSES = np.array([0, 1, 2, 3], dtype=np.uint8)
LABELS = {"2021": np.array([0, 1, 2, 4], dtype=np.uint8), "2023": np.array([0, 1, 2, 3], dtype=np.uint8)}
# WT, TC, ET membership of each class above
REGIONS = np.array([[0, 1, 1, 1],   # WT = NCR + ED + ET
                    [0, 1, 0, 1],   # TC = NCR + ET
                    [0, 0, 0, 1]],  # ET
                   dtype=bool)


@pytest.mark.parametrize("convention", ["2021", "2023"])
def test_labels_to_classes_and_back(convention):
    labels = LABELS[convention].reshape(2, 2, 1)
    classes = labels_to_classes(labels, convention)
    assert classes.dtype == np.uint8 and classes.shape == (2, 2, 1)
    np.testing.assert_array_equal(classes.ravel(), CLASSES)
    np.testing.assert_array_equal(classes_to_labels(classes, convention), labels)


def test_et_value_differs_between_conventions():
    assert classes_to_labels(np.array([3]), "2021")[0] == 4
    assert classes_to_labels(np.array([3]), "2023")[0] == 3
    # a 2023 ET voxel read with the 2021 convention would not be ET: the convention matters
    assert labels_to_classes(np.array([3]), "2023")[0] == 3


@pytest.mark.parametrize("values,expected", [
    ([0, 1, 2, 4], "2021"), ([0, 4], "2021"), ([0, 1, 2, 3], "2023"), ([3], "2023"),
    ([0, 1, 2], None), ([0], None), ([], None), (np.array([0, 2, 4], dtype=np.uint8), "2021"),
])
def test_detect_convention(values, expected):
    assert detect_convention(values) == expected


@pytest.mark.parametrize("values", [[0, 1, 2, 3, 4], [0, 5], [0, 1, 2, 4, 255]])
def test_detect_convention_rejects_unexpected_values(values):
    with pytest.raises(ValueError, match="unexpected label values"):
        detect_convention(values)


def test_classes_to_regions_numpy_and_torch():
    np.testing.assert_array_equal(classes_to_regions(CLASSES), REGIONS)
    out = classes_to_regions(torch.from_numpy(CLASSES))
    assert out.dtype == torch.bool
    np.testing.assert_array_equal(out.numpy(), REGIONS)


def test_classes_to_regions_batch():
    batch = torch.tensor([[0, 1, 2, 3], [3, 3, 0, 2]]).reshape(2, 4, 1, 1)
    out = classes_to_regions_batch(batch)
    assert out.shape == (2, 3, 4, 1, 1) and out.dtype == torch.float32
    np.testing.assert_array_equal(out[0, :, :, 0, 0].numpy(), REGIONS.astype(np.float32))
    np.testing.assert_array_equal(out[1, :, :, 0, 0].numpy(), [[1, 1, 0, 1], [1, 1, 0, 0], [1, 1, 0, 0]])
    np.testing.assert_array_equal(classes_to_regions_batch(batch[:, None]).numpy(), out.numpy())


def test_regions_to_classes_paints_nested_order():
    # columns: nothing; WT only; WT+TC; WT+TC+ET; ET without WT/TC (inconsistent: ET wins)
    probs = np.array([[0.1, 0.9, 0.9, 0.9, 0.2],
                      [0.1, 0.2, 0.8, 0.7, 0.1],
                      [0.1, 0.3, 0.4, 0.6, 0.9]], dtype=np.float32)
    np.testing.assert_array_equal(regions_to_classes(probs), [0, 2, 1, 3, 3])
    np.testing.assert_array_equal(regions_to_classes(torch.from_numpy(probs)).numpy(), [0, 2, 1, 3, 3])
    np.testing.assert_array_equal(regions_to_classes(probs, threshold=0.85), [0, 2, 2, 2, 3])


def test_regions_round_trip():
    np.testing.assert_array_equal(regions_to_classes(classes_to_regions(CLASSES).astype(np.float32)), CLASSES)


def test_region_masks_from_file_labels():
    masks = region_masks(LABELS["2021"], convention="2021")
    for i, name in enumerate(("WT", "TC", "ET")):
        np.testing.assert_array_equal(masks[name], REGIONS[i])


def test_output_modes():
    assert output_channels("labels") == 4 and output_channels("regions") == 3
    logits = torch.tensor([[[2.0]], [[0.0]], [[-1.0]], [[1.0]]]).reshape(1, 4, 1, 1, 1)
    probs = logits_to_probabilities(logits, "labels")
    np.testing.assert_allclose(probs.sum(1).numpy(), 1.0, rtol=1e-6)
    assert probabilities_to_classes(probs[0], "labels").item() == 0
    sig = logits_to_probabilities(logits[:, 1:], "regions")  # sigmoid(0, -1, 1) = 0.5, 0.27, 0.73
    np.testing.assert_allclose(sig.flatten().numpy(), [0.5, 0.26894, 0.73106], atol=1e-4)
    assert probabilities_to_classes(sig[0], "regions").item() == 3  # ET > 0.5 painted last


def test_labels_argmax_by_hand_with_ties():
    """Per voxel: the class of the highest probability; on a tie the lowest class, as argmax."""
    probs = torch.tensor([[0.1, 0.4, 0.25, 0.25, 0.0],   # background
                          [0.2, 0.4, 0.25, 0.25, 0.0],   # NCR
                          [0.3, 0.1, 0.25, 0.5, 0.0],    # ED
                          [0.4, 0.1, 0.25, 0.0, 0.0]])   # ET
    expected = [3, 0, 0, 2, 0]
    for image in (probs.reshape(4, 5, 1, 1), probs.numpy().reshape(4, 1, 5, 1)):
        classes = probabilities_to_classes(image, "labels")
        assert classes.dtype in (torch.uint8, np.uint8)
        assert np.asarray(classes).ravel().tolist() == expected


@pytest.mark.parametrize("channels, dtype", [(2, torch.float32), (4, torch.float32), (4, torch.float64),
                                             (4, torch.bfloat16), (7, torch.float32)])
def test_labels_argmax_matches_torch_argmax(channels, dtype):
    probs = torch.rand((channels, 9, 8, 7), generator=torch.Generator().manual_seed(channels)).to(dtype)
    probs[:, 0] = 0.5  # a plane of exact ties
    expected = probs.float().argmax(dim=0).to(torch.uint8)
    assert torch.equal(probabilities_to_classes(probs, "labels"), expected)
    flipped = probs.numpy()[:, ::-1] if dtype != torch.bfloat16 else None  # a negative-stride array
    if flipped is not None:
        np.testing.assert_array_equal(probabilities_to_classes(flipped, "labels"), expected.numpy()[::-1])
