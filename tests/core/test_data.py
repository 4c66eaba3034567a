"""Data plumbing: datasets built by name (validated options), collation, the batch order."""
from __future__ import annotations

import pytest

from discon_core.data import BatchOrder, build_dataset, class_names
from discon_core.errors import DisconError
from tests.plugins.test_datasets import fake_fashion_mnist


def test_build_dataset_validates(tmp_path):
    root = fake_fashion_mnist(tmp_path / "fm", n=8)
    assert len(build_dataset({"type": "fashion-mnist", "root": str(root)})) == 8
    with pytest.raises(DisconError, match="unknown data.type 'fashion_mnist'.*fashion-mnist"):
        build_dataset({"type": "fashion_mnist"})
    with pytest.raises(DisconError, match="data .*unknown option.*lmit"):
        build_dataset({"type": "fashion-mnist", "root": str(root), "lmit": 3})


def test_class_names_from_a_list_or_a_dataset():
    assert class_names(["cat", 3]) == ["cat", "3"]
    assert class_names("fashion-mnist")[-1] == "Ankle boot"
    with pytest.raises(DisconError, match="unknown dataset 'folder'.*fashion-mnist"):
        class_names("folder")          # registered, but its classes depend on the folder


def test_batch_order_pure_resumable_and_sharded():
    order = BatchOrder(50, 8, seed=3)
    assert order.steps_per_epoch == 6
    first = [order.batch(s) for s in range(14)]
    again = BatchOrder(50, 8, seed=3)
    assert [again.batch(s) for s in (13, 2, 7)] == [first[13], first[2], first[7]]
    epoch0 = sorted(i for s in range(6) for i, _ in first[s])
    assert len(set(epoch0)) == 48                               # no repeats within an epoch
    assert first[6] != first[0]                                 # a new permutation per epoch
    ranks = [BatchOrder(50, 8, seed=3, rank=r, world=2) for r in range(2)]
    for s in (0, 9):
        assert ranks[0].batch(s) + ranks[1].batch(s) == first[s]
    assert order.position(13) == {"epoch": 2, "batch": 1, "global_batch": 8, "seed": 3,
                                  "num_items": 50}
    with pytest.raises(DisconError, match="multiple of the number of processes"):
        BatchOrder(50, 9, world=2)
    with pytest.raises(DisconError, match="fewer than one global batch"):
        BatchOrder(5, 8)
