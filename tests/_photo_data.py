"""A tiny folder dataset for the training and CLI tests: six 64×64 crops of real photographs."""
import pytest
from PIL import Image


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    import skimage.data as skd

    d = tmp_path_factory.mktemp("photos")
    for name in ["camera", "astronaut", "coffee"]:
        a = getattr(skd, name)()
        for k, (r, c) in enumerate([(100, 100), (300, 200)]):
            Image.fromarray(a[r:r + 64, c:c + 64]).save(d / f"{name}_{k}.png")
    return str(d)
