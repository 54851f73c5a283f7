"""Class frequency bins: counted from the training split or taken from the dataset."""

import numpy as np
import pytest

from jaxscaleseg import metrics
from jaxscaleseg.data import frequency
from jaxscaleseg.data.synthetic import SyntheticSegmentation


class _LabelsOnly:
    """A source without ``image_classes``: counting must decode the labels."""

    def __init__(self, source, metadata=None):
        self._source = source
        if metadata is not None:
            self.dataset_info = type("Info", (), {"metadata": metadata})()

    def __len__(self):
        return len(self._source)

    def __getitem__(self, index):
        return self._source[index]


def test_synthetic_long_tail_is_binned_by_its_known_frequencies():
    # 600 images, Zipf s = 1.2 over 60 classes: quotas from ~900 regions for the first rank
    # down to a few, so all three bins are populated.
    source = SyntheticSegmentation(60, (24, 24), 600, seed=1, zipf_exponent=1.2)
    result = frequency.class_frequency(source, 60)
    assert result["source"] == "training split" and result["num_classes"] == 60
    counts = np.asarray(result["train_images"])
    # The same counts from the decoded labels (no image_classes shortcut).
    np.testing.assert_array_equal(counts, frequency.train_image_counts(_LabelsOnly(source), 60))
    assert result["bins"] == metrics.frequency_bins(counts).tolist()
    assert {"rare", "common", "frequent"} <= set(result["bins"])
    # The law decides the ends: the first rank is frequent, the last one rare.
    bins = np.asarray(result["bins"])
    assert bins[source.class_ranks == 1][0] == "frequent"
    assert bins[source.class_ranks == 60][0] == "rare"
    # Two images cannot hold 30 classes: the classes in no training image are rare too.
    few = frequency.class_frequency(SyntheticSegmentation(30, (24, 24), 2), 30)
    assert 0 in few["train_images"] and set(few["bins"]) == {"rare"}


def test_dataset_labels_win_and_the_rest_is_counted():
    source = SyntheticSegmentation(4, (24, 24), 3, seed=0)
    labelled = _LabelsOnly(source, {"class_frequency": ["f", None, "common", ""]})
    result = frequency.class_frequency(labelled, 4)
    counts = frequency.train_image_counts(source, 4)
    assert result["source"] == "dataset + training split"
    assert result["bins"][0] == "frequent" and result["bins"][2] == "common"
    assert result["bins"][1] == result["bins"][3] == "rare"  # counted: at most 3 images
    assert result["train_images"] == counts.tolist()
    full = frequency.class_frequency(_LabelsOnly(source, {"class_frequency": list("rcfr")}), 4)
    assert full["source"] == "dataset" and full["train_images"] == [None] * 4
    assert full["bins"] == ["rare", "common", "frequent", "rare"]
    with pytest.raises(ValueError, match="3 entries for 4 classes"):
        frequency.class_frequency(_LabelsOnly(source, {"class_frequency": list("rcf")}), 4)
    with pytest.raises(ValueError, match="unknown bin 'x'"):
        frequency.class_frequency(_LabelsOnly(source, {"class_frequency": list("rcfx")}), 4)
