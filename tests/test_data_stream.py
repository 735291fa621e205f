"""Folders larger than memory: decoded on demand into a bounded cache, the same crops and the same
trained weights as when every image is held in memory, and exact resumes."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from msconv.data import CropSampler, load_dataset, load_folder
from msconv.data.stream import LazyImages
from msconv.train import TrainConfig, Trainer


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream")
    rng = np.random.default_rng(0)
    for i in range(12):
        h, w = 48 + 8 * (i % 3), 64 + 4 * (i % 5)
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(d / f"im{i:02d}.png")
    return str(d)


def test_a_folder_over_the_memory_limit_is_decoded_on_demand_within_the_cache(folder):
    eager = load_folder(folder, gray=False)
    lazy = load_folder(folder, gray=False, memory_mb=0.1)  # 12 images of ~40 kB float32 each: over 0.1 MB
    assert isinstance(lazy.images, LazyImages) and lazy.images.decoded == 0  # only headers were read
    assert lazy.shapes() == eager.shapes() and lazy.channels == 3 and lazy.min_side() == eager.min_side()
    a, b = CropSampler(eager, 32, seed=3), CropSampler(lazy, 32, seed=3)
    for _ in range(20):
        assert torch.equal(a.next_batch(4), b.next_batch(4))
    cached = sum(t.numel() * t.element_size() for t in lazy.images._cache.values())
    assert cached <= 0.1e6 and lazy.images.decoded >= len(lazy)
    assert load_folder(folder, gray=False, memory_mb=100).images.__class__ is list  # fits: read up front


def test_streamed_training_equals_in_memory_training_and_resumes_exactly(folder, tmp_path):
    base = dict(data=folder, crop=32, depth=2, width=4, batch_size=2, iterations=6, val_crop=32, val_points=1,
                progress=False, tensorboard=False, threads=1, gray=False, ckpt_every=2)
    ref = Trainer(TrainConfig(**base, out=str(tmp_path / "mem"))).run()
    t = Trainer(TrainConfig(**base, out=str(tmp_path / "lazy"), data_memory_mb=0.1))
    assert t.train_set.lazy
    assert t.run()["psnr"] == ref["psnr"]

    def stop(trainer, step):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(TrainConfig(**base, out=str(tmp_path / "cut"), data_memory_mb=0.1), on_step=stop).run()
    r = Trainer(TrainConfig(**base, out=str(tmp_path / "cut"), data_memory_mb=0.1, resume=True)).run()
    assert r["psnr"] == ref["psnr"]
    wa = torch.load(tmp_path / "mem" / "model.pt")
    wb = torch.load(tmp_path / "cut" / "model.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_lazy_sets_split_and_fingerprint_without_decoding(folder):
    train, val = load_dataset(folder, None, True, 0.25, 0, memory_mb=0.01)
    assert train.lazy and val.lazy and len(train) + len(val) == 12
    assert not set(train.names) & set(val.names)
    assert train.fingerprint() != val.fingerprint() and train.images.decoded == 0


def test_an_unreadable_file_in_a_streamed_folder_is_named_or_skipped(folder, tmp_path):
    import shutil

    from msconv.data import ImageReadError

    d = tmp_path / "bad"
    shutil.copytree(folder, d)
    (d / "broken.png").write_text("not an image")
    with pytest.raises(ImageReadError, match="broken.png"):
        load_folder(str(d), memory_mb=0.01)
    with pytest.warns(UserWarning, match="broken.png"):
        ds = load_folder(str(d), memory_mb=0.01, on_bad_file="skip")
    assert ds.lazy and "broken.png" not in ds.names and os.path.exists(d / "broken.png")
