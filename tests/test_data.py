"""The protocol's splits, and batched preprocessing against the per-image path."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

import data
import folders
from data import ANOMALOUS, NORMAL, Augment, Preprocess, batches, center, random_augment, stratified_split
from helpers import CIFAR10_JPEG as CIFAR_JPEG
from helpers import image_folder


def test_stratified_split_is_seeded_and_stratified():
    labels = np.repeat(np.arange(10), 100)
    train, val = stratified_split(labels, 0.1, seed=3)
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == len(labels)
    assert (np.bincount(labels[val], minlength=10) == 10).all()
    again, _ = stratified_split(labels, 0.1, seed=3)
    other, _ = stratified_split(labels, 0.1, seed=4)
    assert (again == train).all() and not (other == train).all()


def test_one_class_protocol(tmp_path):
    root = image_folder(tmp_path / "d", n_train=40, n_test=10)
    source = folders.open_source(root, image_size=32)
    d = data.one_class_data(source, "bee", seed=0)
    assert d.normal_class == 1 and d.class_name == "bee"
    # train: normal class only, 90% of it; val: 10% of every class, labelled
    assert len(d.train) == 36 and len(d.val) == 12 and (d.val_labels == NORMAL).sum() == 4
    assert len(d.test) == 30 and (d.test_labels == NORMAL).sum() == 10 and (d.test_labels == ANOMALOUS).sum() == 20
    # every image is tagged with its own colour by image_folder: no test image appears in train or val
    def ids(images):
        return {tuple(im[:, 0, 0].tolist()) for im in images}
    assert not ids(d.test) & (ids(d.train) | ids(d.val))
    assert not ids(d.train) & ids(d.val)
    assert {i[0] for i in ids(d.train)} == {1}  # the red channel encodes the class


def test_limit_keeps_both_kinds(tmp_path):
    source = folders.open_source(image_folder(tmp_path / "d", n_train=40, n_test=10), image_size=32)
    d = data.one_class_data(source, 0, seed=0, limit=7)
    assert len(d.train) == 7 and len(d.test) == 7 and len(d.val) == 7
    assert set(d.test_labels.tolist()) == {NORMAL, ANOMALOUS} == set(d.val_labels.tolist())
    with pytest.raises(data.DataError, match="--limit 1 leaves no room"):
        data.one_class_data(source, 0, seed=0, limit=1)


def test_class_names_and_indices(tmp_path):
    source = folders.open_source(image_folder(tmp_path / "d"), image_size=32)
    assert folders.class_index(source, "cow") == folders.class_index(source, "2") == 2
    for bad in ("horse", "3", "-1"):
        with pytest.raises(data.DataError, match="0=ant, 1=bee, 2=cow"):
            folders.class_index(source, bad)


@pytest.mark.parametrize("augment", [False, True])
def test_batched_preprocessing_matches_per_image_transforms(augment):
    """Fast path (one interpolate per batch, indexing for crop/flip) == torchvision per image, to float tolerance."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=g)
    size, mean, std = 56, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    aug = random_augment(6, size, g) if augment else center(6, size)
    fast = Preprocess(size, mean, std, "cpu")(images, aug)
    for i in range(6):
        x = TF.to_dtype(images[i], torch.float32, scale=True)
        x = TF.resize(x, [64, 64], antialias=True)  # 56 * 256 / 224 = 64
        x = TF.crop(x, int(aug.top[i]), int(aug.left[i]), size, size)
        x = TF.horizontal_flip(x) if aug.flip[i] else x
        ref = TF.normalize(x, mean, std)
        torch.testing.assert_close(fast[i], ref, atol=1e-5, rtol=1e-5)
    if augment:
        assert aug.flip.any() and not aug.flip.all() and len(set(aug.top.tolist())) > 1


def test_plain_pil_path_matches_fast_path_up_to_uint8_rounding():
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8, generator=g)
    prep = Preprocess(32, (0.5,) * 3, (0.25,) * 3, "cpu")
    order = torch.randperm(10, generator=g)
    aug = random_augment(10, 32, g)
    fast = torch.cat([x for _, x in batches(images, order, aug, 4, prep)])
    plain = torch.cat([x for _, x in batches(images, order, aug, 4, prep, plain=True, workers=0)])
    # PIL resizes uint8 -> uint8 in fixed point: at most one grey level apart (1 / 255 / std after normalising),
    # about a third of a level on average (0.31 measured here)
    levels = (fast - plain).abs() * 0.25 * 255
    assert levels.max() <= 1 + 1e-4 and levels.mean() < 0.4, (levels.max(), levels.mean())


def test_augment_slices_follow_the_order():
    aug = Augment(torch.arange(5), torch.arange(5) * 2, torch.tensor([1, 0, 1, 0, 1]).bool())
    part = aug[1:3]
    assert part.top.tolist() == [1, 2] and part.left.tolist() == [2, 4] and part.flip.tolist() == [False, True]


@pytest.mark.skipif(not CIFAR_JPEG.is_dir(), reason="no CIFAR-10 JPEGs (KDAD_CIFAR10_JPEG)")
def test_real_cifar10_folder():
    source = folders.open_source(CIFAR_JPEG, image_size=224)
    assert source.classes == list(data.CIFAR10_CLASSES) and source.normal_classes == list(range(10))
    assert source.test_only == [] and source.skipped == []
    assert len(source.labels["train"]) == 50_000 and len(source.labels["test"]) == 10_000
    d = data.one_class_data(source, "cat", seed=0, limit=40)
    assert d.train.shape == (40, 3, 32, 32) and d.train.dtype == torch.uint8
    assert set(d.test_labels.tolist()) == {NORMAL, ANOMALOUS}


def test_torchvision_cifar10_source(monkeypatch, tmp_path):
    """The --data-root path: torchvision's CIFAR10 (stood in for here: the tests cannot download it)."""
    import torchvision

    class FakeCIFAR10:
        def __init__(self, root, train, download):
            n = 100 if train else 20
            self.data = np.random.default_rng(int(train)).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
            self.targets = [i % 10 for i in range(n)]
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    source = folders.open_source(None, tmp_path, image_size=32)
    d = data.one_class_data(source, "cat", seed=0)
    assert d.class_name == "cat" and len(d.train) == 9 and d.train.shape[1:] == (3, 32, 32)
    assert (d.test_labels == NORMAL).sum() == 2 and len(d.test) == 20

    def offline(root, *args, **kwargs):
        Path(root).mkdir(parents=True, exist_ok=True)  # as torchvision does before it downloads
        raise RuntimeError("Error downloading cifar-10-python.tar.gz")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(data.DataError, match="could not get CIFAR-10 into .* without network, see 'Without "
                                             "network' in the README: --data-dir takes an image folder"):
        folders.open_source(None, tmp_path / "data", image_size=32)
    assert not (tmp_path / "data").exists()  # a failed first download leaves no empty folder behind


def test_a_damaged_cifar10_download_is_blamed_not_the_network(monkeypatch, tmp_path):
    """Offline, torchvision takes a damaged archive (or batch file) for a missing one and tries to download it:
    the line names the damaged file, not the name resolution that failed."""
    import socket
    import urllib.error
    import urllib.request

    def no_dns(*args, **kwargs):
        raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))
    monkeypatch.setattr(urllib.request, "urlopen", no_dns)
    root = tmp_path / "data"
    root.mkdir()
    archive = root / "cifar-10-python.tar.gz"
    archive.write_bytes(np.random.default_rng(0).bytes(5000))  # the first 5 kB of a 170 MB download
    with pytest.raises(data.DataError, match=r"cifar-10-python.tar.gz \(5000 bytes\) is damaged: its md5 is not the "
                                             r"one torchvision publishes .* delete it and run again"):
        folders.open_source(None, root, image_size=32)
    assert archive.is_file()  # kept: deleting it is the user's call
    archive.unlink()
    batch = root / "cifar-10-batches-py" / "data_batch_1"  # extracted earlier, one batch cut short since
    batch.parent.mkdir()
    batch.write_bytes(b"\0" * 100)
    with pytest.raises(data.DataError, match=r"data_batch_1 \(100 bytes\) is damaged"):
        folders.open_source(None, root, image_size=32)
    batch.unlink()
    with pytest.raises(data.DataError, match="could not get CIFAR-10 into .*Temporary failure in name resolution"):
        folders.open_source(None, root, image_size=32)  # nothing there: then it is the network
