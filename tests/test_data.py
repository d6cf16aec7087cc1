"""Datasets (folders, tars read in place, builtin digits), samplers and augmentation."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from spatial_attention.apps.training.data import (
    BatchTransform,
    DigitsDataset,
    FolderDataset,
    ResumableDistributedSampler,
    ShardSampler,
    TarDataset,
    augment_params,
    open_datasets,
)
from spatial_attention.errors import UsageError

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"
CLASSES = ("cat", "dog", "emu")


def _png(seed: int, size: int = 12) -> bytes:
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def make_folder(root: Path, per_class: int = 4, corrupt: bool = False) -> Path:
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            (root / name / f"{i:04d}.png").write_bytes(_png(100 * c + i))
        (root / name / "notes.txt").write_text("not an image")
    if corrupt:
        (root / "dog" / "9999.jpg").write_bytes(b"\xff\xd8\xff garbage, not a jpeg")
    return root


def make_tar(path: Path, prefix: str, per_class: int = 4, corrupt: bool = False) -> Path:
    with tarfile.open(path, "w") as tf:
        for c, name in enumerate(CLASSES):
            for i in range(per_class):
                data = _png(1000 * c + i + hash(prefix) % 7)
                info = tarfile.TarInfo(f"{prefix}/{name}/{i:04d}.png")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        if corrupt:
            info = tarfile.TarInfo(f"{prefix}/cat/bad.jpg")
            info.size = 10
            tf.addfile(info, io.BytesIO(b"0123456789"))
    return path


def test_digits_split_fixed_and_disjoint():
    tr, va = DigitsDataset("train", 16), DigitsDataset("val", 16)
    assert len(tr) == 1437 and len(va) == 360
    img, label, key = tr[5]
    assert img.shape == (3, 16, 16) and img.dtype == torch.uint8 and key == 5
    assert 0 <= label < 10
    # same split every time, and no image in both
    assert DigitsDataset("val", 16).targets == va.targets
    a = {bytes(x.numpy()) for x in tr.images[:, 0]}
    b = [bytes(x.numpy()) for x in va.images[:, 0]]
    assert sum(x in a for x in b) < 20  # (the digits set has a few exact duplicates)


def test_folder_dataset_and_unreadable(tmp_path):
    root = make_folder(tmp_path / "imgs", corrupt=True)
    ds = FolderDataset(root, size=8)
    assert ds.classes == list(CLASSES)
    assert len(ds) == 13  # 12 images + the corrupt one, not the .txt files
    labels = [ds[i][1] for i in range(len(ds))]
    assert labels.count(-1) == 1
    bad = labels.index(-1)
    assert ds.describe(bad).endswith("dog/9999.jpg")
    assert ds[0][0].shape == (3, 8, 8)  # 12x12 resized to 8x8


def test_tar_dataset_reads_in_place_with_workers(tmp_path):
    tar = make_tar(tmp_path / "train.tar", "train", corrupt=True)
    ds = TarDataset(tar, size=12)
    assert ds.classes == list(CLASSES) and len(ds) == 13
    folder = make_folder(tmp_path / "ref")
    del folder
    # decoded bytes equal the PNG that went in
    i = ds.names.index("train/dog/0002.png")
    from PIL import Image

    ref = np.array(Image.open(io.BytesIO(_png(1000 + 2 + hash("train") % 7))).convert("RGB"))
    assert torch.equal(ds[i][0], torch.from_numpy(ref).permute(2, 0, 1))
    # per-worker file handles: two workers read the same images as the main process
    loader = DataLoader(ds, batch_size=4, num_workers=2)
    got = torch.cat([x for x, _, _ in loader])
    want = torch.stack([ds[j][0] for j in range(len(ds))])
    assert torch.equal(got, want)
    assert sum(int((y < 0).sum()) for _, y, _ in loader) == 1


def test_open_datasets_tar_finds_sibling_test(tmp_path):
    make_tar(tmp_path / "train.tar", "train")
    make_tar(tmp_path / "test.tar", "test", per_class=2)
    tr, va, info = open_datasets(str(tmp_path / "train.tar"), size=12)
    assert len(tr) == 12 and len(va) == 6
    assert info.classes == list(CLASSES) and info.val.endswith("test.tar")
    assert len(info.mean) == 3 and all(0 < s < 1 for s in info.std)


def test_open_datasets_folder_split_and_errors(tmp_path):
    root = make_folder(tmp_path / "imgs", per_class=10)
    tr, va, info = open_datasets(str(root), size=8, val_split=0.2)
    assert len(tr) == 24 and len(va) == 6 and info.notes
    tr2, va2, _ = open_datasets(str(root), size=8, val_split=0.2)
    assert va.indices == va2.indices and not set(va.indices) & set(tr.indices)
    # root/train + root/val
    make_folder(tmp_path / "split" / "train")
    make_folder(tmp_path / "split" / "val", per_class=1)
    tr, va, _ = open_datasets(str(tmp_path / "split"), size=8)
    assert len(tr) == 12 and len(va) == 3
    with pytest.raises(UsageError, match="^data path .*nowhere does not exist$"):
        open_datasets(str(tmp_path / "nowhere"))
    with pytest.raises(UsageError, match="unknown builtin"):
        open_datasets("builtin:mnist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no images found"):
        open_datasets(str(tmp_path / "empty"))
    other = tmp_path / "other"
    (other / "zebra").mkdir(parents=True)
    (other / "zebra" / "a.png").write_bytes(_png(0))
    with pytest.raises(UsageError, match="classes differ"):
        open_datasets(str(root), val=str(other))


def test_compressed_tar_is_refused(tmp_path):
    src = make_tar(tmp_path / "plain.tar", "train")
    gz = tmp_path / "train.tar.gz"
    with tarfile.open(gz, "w:gz") as tf:
        tf.add(src, arcname="x.tar")
    with pytest.raises(UsageError, match="not an uncompressed tar"):
        TarDataset(gz)


def test_augment_params_pure_and_spread():
    keys = torch.arange(4000)
    dy, dx, flip = augment_params(keys, epoch=3, seed=7, pad=4)
    dy2, dx2, flip2 = augment_params(keys.flip(0), epoch=3, seed=7, pad=4)
    assert torch.equal(dy, dy2.flip(0)) and torch.equal(flip, flip2.flip(0))
    assert dy.min() == 0 and dy.max() == 8 and dx.min() == 0 and dx.max() == 8
    assert 0.45 < flip.float().mean() < 0.55
    assert not torch.equal(dy, augment_params(keys, epoch=4, seed=7, pad=4)[0])
    assert not torch.equal(dy, augment_params(keys, epoch=3, seed=8, pad=4)[0])


def test_batch_transform_crop_flip_normalise():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.int64).remainder(256).to(torch.uint8)
    x = x.view(2, 3, 8, 8)
    keys = torch.tensor([10, 11])
    t = BatchTransform([0.5] * 3, [0.25] * 3, seed=1, pad=2)
    out = t(x, keys, epoch=0, train=True)
    assert out.shape == (2, 3, 8, 8) and out.dtype == torch.float32
    dy, dx, flip = augment_params(keys, 0, 1, 2)
    for b in range(2):
        padded = torch.nn.functional.pad(x[b].float(), (2, 2, 2, 2))
        crop = padded[:, dy[b]:dy[b] + 8, dx[b]:dx[b] + 8]
        if flip[b]:
            crop = crop.flip(-1)
        torch.testing.assert_close(out[b], (crop / 255 - 0.5) / 0.25)
    # evaluation: no augmentation
    torch.testing.assert_close(t(x, keys, 0, train=False), (x.float() / 255 - 0.5) / 0.25)


def test_resumable_sampler_matches_global_batches():
    ds = list(range(103))
    single = ResumableDistributedSampler(ds, 8, num_replicas=1, rank=0, seed=3,
                                         drop_last=True)
    ranks = [ResumableDistributedSampler(ds, 4, num_replicas=2, rank=r, seed=3, drop_last=True)
             for r in (0, 1)]
    for s in (single, *ranks):
        s.set_epoch(2)
    one = list(single)
    parts = [list(s) for s in ranks]
    assert single.batches_per_epoch() == ranks[0].batches_per_epoch() == 12
    for k in range(12):
        glob = set(one[8 * k: 8 * k + 8])
        assert glob == set(parts[0][4 * k: 4 * k + 4]) | set(parts[1][4 * k: 4 * k + 4])
    single.set_epoch(2, start_batch=5)
    assert list(single) == one[40:] and len(single) == len(one) - 40
    assert list(ShardSampler(10, 1, 3)) == [1, 4, 7]


@pytest.mark.skipif(not (CIFAR / "test.tar").is_file(), reason="../shared/data/cifar10 absent")
def test_real_cifar10_test_tar():
    ds = TarDataset(CIFAR / "test.tar", size=32)
    assert len(ds) == 10_000 and ds.classes[0] == "airplane" and ds.classes[-1] == "truck"
    img, label, _ = ds[1234]
    assert img.shape == (3, 32, 32) and label == ds.targets[1234] >= 0
