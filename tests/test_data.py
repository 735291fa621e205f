"""Embedded default data, folders by path, splits, the crop sampler, bad files (msconv.data)."""
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from msconv.data import (CropSampler, ImageReadError, ImageSet, bundled_images, bundled_split, load_dataset,
                         load_folder, split_by_image)

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.fixture(scope="module")
def bundled():
    return bundled_images(gray=True)


def test_bundled_are_real_photos_in_unit_range(bundled):
    assert len(bundled) >= 8
    assert "camera" in bundled.names and "astronaut" in bundled.names
    for im, n in zip(bundled.images, bundled.names):
        assert im.dtype == torch.float32 and im.shape[0] == 1, n
        assert 0 <= im.min() and im.max() <= 1 and im.std() > 0.02, n
        assert min(im.shape[1:]) >= 256, n


def test_rgb_mode_has_three_channels():
    ds = bundled_images(gray=False, names=["astronaut", "camera"])
    assert [im.shape[0] for im in ds.images] == [3, 3]


def test_split_disjoint_deterministic_and_seed_dependent(bundled):
    a_tr, a_va = split_by_image(bundled, 0.2, seed=0)
    b_tr, b_va = split_by_image(bundled, 0.2, seed=0)
    assert a_tr.names == b_tr.names and a_va.names == b_va.names
    assert not set(a_tr.names) & set(a_va.names)
    assert sorted(a_tr.names + a_va.names) == sorted(bundled.names)
    others = {tuple(split_by_image(bundled, 0.2, seed=s)[1].names) for s in range(1, 6)}
    assert others - {tuple(a_va.names)}
    # Independent of the order the images arrived in.
    rev = ImageSet(bundled.images[::-1], bundled.names[::-1])
    assert split_by_image(rev, 0.2, seed=0)[1].names == a_va.names


def test_crop_sampler_deterministic_resumable_and_covers_epoch(bundled):
    s = CropSampler(bundled, 32, seed=5)
    first = s.next_batch(3)
    state = s.state_dict()
    nxt = s.next_batch(4)
    s2 = CropSampler(bundled, 32, seed=123)
    s2.load_state_dict(state)
    assert torch.equal(s2.next_batch(4), nxt)
    assert torch.equal(CropSampler(bundled, 32, seed=5).next_batch(3), first)
    s3 = CropSampler(bundled, 32, seed=0)
    s3.next_batch(len(bundled))
    assert sorted(s3.order) == list(range(len(bundled))) and s3.pos == len(bundled)


def test_crop_larger_than_image_is_a_clear_error():
    ds = ImageSet([torch.rand(1, 20, 30)], ["tiny.png"])
    with pytest.raises(ValueError, match=r"tiny\.png.*--crop <= 20"):
        CropSampler(ds, 32)


def _write(folder, name, arr):
    Image.fromarray(arr).save(os.path.join(folder, name))


def test_folder_formats_and_corrupt_file(tmp_path):
    rng = np.random.default_rng(0)
    _write(tmp_path, "a.png", rng.integers(0, 255, (40, 50), dtype=np.uint8))
    _write(tmp_path, "b.bmp", rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))
    _write(tmp_path, "c.tif", rng.integers(0, 65535, (40, 50), dtype=np.uint16))
    _write(tmp_path, "d.jpg", rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    ds = load_folder(str(tmp_path), gray=False)
    assert ds.names == ["a.png", "b.bmp", "c.tif", "d.jpg"]
    assert all(im.shape == (3, 40, 50) and 0 <= im.min() and im.max() <= 1 for im in ds.images)
    (tmp_path / "e.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ImageReadError, match=r"e\.png.*--skip-bad-files"):
        load_folder(str(tmp_path))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ds = load_folder(str(tmp_path), on_bad_file="skip")
    assert "e.png" not in ds.names and len(ds) == 4 and any("e.png" in str(x.message) for x in w)


def test_missing_folder_and_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_folder(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no readable images"):
        load_folder(str(tmp_path))


def test_load_dataset_with_separate_validation(tmp_path):
    tr, va = tmp_path / "tr", tmp_path / "va"
    tr.mkdir(), va.mkdir()
    for i in range(3):
        _write(tr, f"{i}.png", np.full((16, 16), 10 * i, np.uint8))
    _write(va, "v.png", np.zeros((16, 16), np.uint8))
    a, b = load_dataset(str(tr), str(va))
    assert len(a) == 3 and b.names == ["v.png"]


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED, "Set5")), reason="../shared/data/Set5 not present")
def test_shared_benchmark_read_by_path():
    ds = load_folder(os.path.join(SHARED, "Set5"), gray=False)
    assert len(ds) == 5 and all(im.shape[0] == 3 for im in ds.images)


def test_bundled_split_helper():
    tr, va = bundled_split(seed=0)
    assert len(tr) > len(va) >= 1
