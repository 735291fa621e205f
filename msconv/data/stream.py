"""Images decoded from disk on demand, for folders larger than memory.

:class:`LazyImages` is a sequence of float32 (C, H, W) images like the list an in-memory
:class:`~msconv.data.ImageSet` holds, but it reads only the file headers up front (sizes), decodes
an image when it is indexed, and keeps the most recently used ones in a cache bounded in bytes.
:meth:`LazyImages.prefetch` decodes images that will be needed soon in background threads (the
decoders release the GIL), so a sampler that knows its next indices does not wait for them.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

__all__ = ["LazyImages", "header_shape"]


def header_shape(path: str, gray: bool) -> tuple[int, int, int]:
    """(C, H, W) the file decodes to, from its header alone (C = 1 if ``gray`` else 3)."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = None  # the size limit is load_image's, checked when it decodes
        with Image.open(path) as im:
            w, h = im.size
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    return (1 if gray else 3, h, w)


class LazyImages(Sequence):
    """The images at ``paths`` (all readable by :func:`msconv.data.load_image` with ``gray`` and
    ``max_megapixels``), decoded when indexed and cached up to ``cache_bytes``.

    ``shapes[i]`` is image i's (C, H, W) without decoding it. Thread-safe."""

    def __init__(self, paths: list[str], gray: bool, max_megapixels: float, cache_bytes: int,
                 shapes: list[tuple[int, int, int]] | None = None, workers: int = 2) -> None:
        self.paths, self.gray, self.max_megapixels = list(paths), gray, max_megapixels
        self.cache_bytes, self.workers = int(cache_bytes), workers
        self.shapes = list(shapes) if shapes is not None else [header_shape(p, gray) for p in self.paths]
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._pending: dict[int, Future] = {}
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self.decoded = 0  # how many decodes ran (a cache miss or a prefetch each)

    def __len__(self) -> int:
        return len(self.paths)

    def _decode(self, i: int) -> torch.Tensor:
        from msconv.data import load_image

        im = load_image(self.paths[i], self.gray, self.max_megapixels)
        with self._lock:
            self.decoded += 1
            self._cache[i] = im
            self._cache.move_to_end(i)
            used = sum(t.numel() * t.element_size() for t in self._cache.values())
            while used > self.cache_bytes and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                used -= old.numel() * old.element_size()
            self._pending.pop(i, None)
        return im

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = range(len(self))[i]
        with self._lock:
            if i in self._cache:
                self._cache.move_to_end(i)
                return self._cache[i]
            pending = self._pending.get(i)
        if pending is not None:
            return pending.result()
        return self._decode(i)

    def prefetch(self, indices) -> None:
        """Start decoding ``indices`` (those not cached or on the way) in background threads, as many
        of them, in order, as fit in half the cache: more would evict each other before they are used."""
        budget, take = self.cache_bytes // 2, []
        for i in indices:
            c, h, w = self.shapes[i]
            budget -= c * h * w * 4
            if budget < 0 and take:
                break
            take.append(i)
        with self._lock:
            todo = [i for i in take if i not in self._cache and i not in self._pending]
            if not todo:
                return
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="msconv-decode")
            for i in todo:
                self._pending[i] = self._pool.submit(self._decode, i)

    def subset(self, indices) -> "LazyImages":
        """The images at ``indices``, sharing nothing decoded."""
        idx = list(indices)
        return LazyImages([self.paths[i] for i in idx], self.gray, self.max_megapixels, self.cache_bytes,
                          [self.shapes[i] for i in idx], self.workers)

    def __getstate__(self):  # picklable (DataLoader workers, spawn): without threads, locks or cache
        state = self.__dict__.copy()
        state.update(_cache=OrderedDict(), _pending={}, _pool=None, _lock=None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()
