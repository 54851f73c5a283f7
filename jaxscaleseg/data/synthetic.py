"""The built-in ``synthetic`` dataset: many-class segmentation without a download.

Example ``i`` of a split is generated deterministically from ``(seed, split, i)``: a few Voronoi
regions, each filled with the appearance of one class, thin void borders between regions, and
mild noise. A class's appearance depends only on its id, so every split (and every seed) agrees
on it:

* two colours from a 6-level-per-channel grid (216 colours), as an unordered pair (the pair is
  stored with the lower colour index first, because a translation-equivariant CNN cannot tell
  ``(a, b)`` stripes from ``(b, a)`` stripes shifted by half a period);
* a stripe texture: one of 4 orientations (0, 45, 90, 135 degrees) times 2 periods (6, 12 px).

That is ``216 * 215 / 2 * 8 = 185_760`` distinct signatures; classes take the first
``num_classes`` of a fixed permutation of them, so nearby ids look unrelated and any two classes
differ in colour or texture. Locally (a patch of about one period) the class is identifiable,
which a small CNN can learn even with thousands of classes.

By default every class is equally frequent and no two classes look alike. Two options make the
set harder in the ways large label spaces are (both off by default, which keeps every example
above unchanged):

* ``family_size = F > 1``: look-alike families. Classes ``F*f ... F*f + F - 1`` form family
  ``f``; its members share both colours and the stripe period and differ only in the stripe
  angle (member ``j`` at ``j * 180 / F`` degrees), so a class's nearest neighbours in
  appearance are its family (see :func:`class_appearance`).
* ``zipf_exponent = s > 0``: long-tailed class frequencies. The class of rank ``r``
  (``1..C``, a permutation of the ids fixed by the data seed, the same for every split) gets a
  share ``r**-s / sum_q q**-s`` of the split's regions, rounded to whole regions with at least
  one region per class when the split has at least ``C`` regions; so at ``s = 1``, 4 000
  training images and 1 284 classes the rarest classes have two regions (in one or two
  images) and the most frequent about 2 600 (in about 1 900 images); see
  ``SyntheticSegmentation.region_quota``.

Records have the same format as a prepared TFDS dataset read with ``tfds.data_source``:
``{"image": uint8 [H, W, 3], "label": [H, W], "file_name": str}``. Labels are uint16 with void
stored as ``STORED_VOID`` (65535) when ``num_classes <= 65535``; above that they are int32 with
void stored as ``IGNORE_INDEX`` (-1), because 65535 is then a real class.
"""

from __future__ import annotations

import functools
import zlib

import numpy as np

from jaxscaleseg.labels import IGNORE_INDEX, STORED_VOID

COLOR_LEVELS = 6
STRIPE_ANGLES_DEG = (0.0, 45.0, 90.0, 135.0)
STRIPE_PERIODS_PX = (6.0, 12.0)
_NUM_COLORS = COLOR_LEVELS**3
_NUM_TEXTURES = len(STRIPE_ANGLES_DEG) * len(STRIPE_PERIODS_PX)
_NUM_PAIRS = _NUM_COLORS * (_NUM_COLORS - 1) // 2
MAX_CLASSES = _NUM_PAIRS * _NUM_TEXTURES
_APPEARANCE_SEED = 20210101  # fixed: the class -> appearance map never depends on a data seed
MAX_FAMILY_SIZE = 8  # members 180/8 = 22.5 degrees apart: still distinct at a 6 px period
_NUM_FAMILY_CODES = _NUM_PAIRS * len(STRIPE_PERIODS_PX)


def max_classes(family_size: int = 1) -> int:
    """The largest class count :func:`class_appearance` supports with this family size."""
    return MAX_CLASSES if family_size == 1 else _NUM_FAMILY_CODES * family_size


def class_appearance(num_classes: int, family_size: int = 1) -> dict[str, np.ndarray]:
    """The deterministic appearance of classes ``0..num_classes-1``.

    Args:
      num_classes: C, at most ``max_classes(family_size)`` (185 760 without families).
      family_size: F in ``1..MAX_FAMILY_SIZE``. 1: no families, every class has its own
        colour pair or texture. F > 1: class ``c`` is member ``c % F`` of family ``c // F``;
        a family's members share both colours and the period and differ only in the angle,
        ``(c % F) * 180 / F`` degrees; families differ in the colour pair or the period.

    Returns:
      A dict with ``color_a`` and ``color_b`` (uint8 [C, 3], the two stripe colours),
      ``angle`` (float32 [C], radians) and ``period`` (float32 [C], pixels). Every class has a
      distinct (unordered colour pair, angle, period) signature and ``color_a != color_b``.

    Raises:
      ValueError: if ``family_size`` or ``num_classes`` is out of range.
    """
    if not 1 <= family_size <= MAX_FAMILY_SIZE:
        raise ValueError(f"family_size must be in 1..{MAX_FAMILY_SIZE}, got {family_size}")
    limit = max_classes(family_size)
    if not 1 <= num_classes <= limit:
        raise ValueError(
            f"num_classes must be in 1..{limit} with family_size={family_size}, got {num_classes}"
        )
    first, second = np.triu_indices(_NUM_COLORS, k=1)
    levels = np.round(np.linspace(0, 255, COLOR_LEVELS)).astype(np.uint8)

    def color(index: np.ndarray) -> np.ndarray:
        digits = np.stack([index // COLOR_LEVELS**2, index // COLOR_LEVELS % COLOR_LEVELS,
                           index % COLOR_LEVELS], axis=-1)  # fmt: skip
        return levels[digits]

    if family_size == 1:
        codes = np.random.default_rng(_APPEARANCE_SEED).permutation(MAX_CLASSES)[:num_classes]
        pair, texture = np.divmod(codes, _NUM_TEXTURES)
        angle_index, period_index = np.divmod(texture, len(STRIPE_PERIODS_PX))
        angle = np.deg2rad(np.asarray(STRIPE_ANGLES_DEG, np.float32))[angle_index]
    else:
        family, member = np.divmod(np.arange(num_classes), family_size)
        num_families = int(family[-1]) + 1
        rng = np.random.default_rng([_APPEARANCE_SEED, family_size])
        codes = rng.permutation(_NUM_FAMILY_CODES)[:num_families][family]
        pair, period_index = np.divmod(codes, len(STRIPE_PERIODS_PX))
        angle = np.deg2rad(member * (180.0 / family_size)).astype(np.float32)
    return {
        "color_a": color(first[pair]),
        "color_b": color(second[pair]),
        "angle": angle,
        "period": np.asarray(STRIPE_PERIODS_PX, np.float32)[period_index],
    }


def zipf_probabilities(ranks: np.ndarray, exponent: float) -> np.ndarray:
    """Zipf's law: the share ``r**-s / sum_q q**-s`` of each class from its rank.

    Args:
      ranks: int [C], a permutation of ``1..C`` (rank 1 is the most frequent class).
      exponent: s >= 0 (0: uniform).

    Returns:
      float64 [C], summing to 1.
    """
    weights = np.asarray(ranks, np.float64) ** -float(exponent)
    return weights / weights.sum()


def region_quota(probabilities: np.ndarray, num_regions: int) -> np.ndarray:
    """Whole numbers of regions per class, proportional to ``probabilities``.

    Each class gets ``floor(n * p)`` regions, at least one when ``n >= C``; the remaining
    regions go to the largest fractional parts, and any excess from the raise to one is taken
    back from the classes with the most regions, so the quota sums to ``n`` exactly.

    Args:
      probabilities: float [C], summing to 1.
      num_regions: n >= 0.

    Returns:
      int64 [C] summing to ``num_regions``.
    """
    p = np.asarray(probabilities, np.float64)
    exact = num_regions * p
    quota = np.floor(exact).astype(np.int64)
    if num_regions >= len(p):
        quota = np.maximum(quota, 1)
    missing = num_regions - int(quota.sum())
    if missing > 0:
        order = np.lexsort((np.arange(len(p)), -(exact - np.floor(exact))))
        quota[order[:missing]] += 1
    while missing < 0:  # only after raising classes to one region; never empties a class
        donors = np.flatnonzero(quota > 1)
        donors = donors[np.lexsort((donors, -quota[donors]))][:-missing]
        quota[donors] -= 1
        missing += len(donors)
    return quota


def make_palette(num_classes: int) -> np.ndarray:
    """A deterministic visualisation colour per class, for any number of classes.

    Colours come from an integer hash of the class id (splitmix64), so they look unrelated for
    neighbouring ids and need no table of size C to be stored anywhere.

    Args:
      num_classes: C.

    Returns:
      uint8 [C, 3].
    """
    x = np.arange(num_classes, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    shifts = np.asarray([0, 8, 16], np.uint64)
    return ((x[:, None] >> shifts) & np.uint64(255)).astype(np.uint8)


def class_names(num_classes: int) -> tuple[str, ...]:
    """Names ``class_00000``, ``class_00001``, ... (at least five digits)."""
    width = max(5, len(str(num_classes - 1)))
    return tuple(f"class_{i:0{width}d}" for i in range(num_classes))


class SyntheticSegmentation:
    """A random-access source of synthetic segmentation examples (no download, no preparation).

    Usable wherever a ``tfds.data_source`` is: ``len(source)`` and ``source[i]`` return the
    same record format (see the module docstring). Generation is vectorised numpy, about a
    millisecond per 128x128 image, so a training run can generate examples on the fly.

    Attributes:
      num_classes: C.
      image_size: (H, W) of every image.
      num_examples: the number of examples in this split.
      seed: the data seed; splits with different names give different examples.
      split: the split name, e.g. "train" or "validation".
      class_names: ``("class_00000", ...)``, C names.
      palette: uint8 [C, 3] visualisation colours (``make_palette``).
    """

    def __init__(
        self,
        num_classes: int,
        image_size: tuple[int, int] = (128, 128),
        num_examples: int = 1000,
        seed: int = 0,
        split: str = "train",
        *,
        regions_range: tuple[int, int] = (3, 7),
        noise_std: float = 6.0,
        zipf_exponent: float = 0.0,
        family_size: int = 1,
    ):
        """Builds the source; nothing is generated until an example is read.

        Args:
          num_classes: C, 1..185 760 (19 ... 100 000 are the intended range).
          image_size: (H, W) of the images.
          num_examples: size of this split.
          seed: data seed (any non-negative int).
          split: split name; mixed into each example's random stream.
          regions_range: inclusive (min, max) number of Voronoi regions per image; with
            ``zipf_exponent = 0`` region classes are uniform over all C classes and balanced
            (see ``_region_classes``), so each class appears in about
            ``num_examples * mean_regions / C`` images.
          noise_std: standard deviation of the per-pixel uniform noise (0..255 units); each
            image also gets a global brightness offset drawn with twice this deviation.
          zipf_exponent: s >= 0; above 0, long-tailed class frequencies: the split's regions
            are shared among the classes by Zipf's law over ``class_ranks`` (see
            ``region_quota``) and dealt to the examples in a random order.
          family_size: F; above 1, look-alike families (see :func:`class_appearance`).
        """
        if num_examples < 0:
            raise ValueError(f"num_examples must be >= 0, got {num_examples}")
        if not zipf_exponent >= 0:
            raise ValueError(f"zipf_exponent must be >= 0, got {zipf_exponent}")
        self._appearance = class_appearance(num_classes, family_size)
        self.num_classes = int(num_classes)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.num_examples = int(num_examples)
        self.seed = int(seed)
        self.split = str(split)
        self.regions_range = (int(regions_range[0]), int(regions_range[1]))
        self.noise_std = float(noise_std)
        self.zipf_exponent = float(zipf_exponent)
        self.family_size = int(family_size)
        self._split_key = zlib.crc32(self.split.encode())
        self._permutations: dict[int, np.ndarray] = {}  # a small cache, see _block_permutation
        h, w = self.image_size
        self._border = max(1.0, min(h, w) / 128.0)  # width of the void band between regions

    def __len__(self) -> int:
        return self.num_examples

    def __repr__(self) -> str:
        options = "".join(
            f", {name}={value}"
            for name, value, default in [
                ("zipf_exponent", self.zipf_exponent, 0.0),
                ("family_size", self.family_size, 1),
            ]
            if value != default
        )
        return (
            f"SyntheticSegmentation(num_classes={self.num_classes}, image_size={self.image_size}, "
            f"num_examples={self.num_examples}, seed={self.seed}, split={self.split!r}, "
            f"regions_range={self.regions_range}, noise_std={self.noise_std}{options})"
        )

    @functools.cached_property
    def class_ranks(self) -> np.ndarray:
        """int64 [C]: each class's frequency rank, 1 (most frequent) .. C.

        A permutation fixed by the data seed alone, so every split agrees on which classes
        are frequent; with ``zipf_exponent = 0`` it only orders equally frequent classes.
        """
        order = np.random.default_rng([self.seed, 4]).permutation(self.num_classes)
        ranks = np.empty(self.num_classes, np.int64)
        ranks[order] = np.arange(1, self.num_classes + 1)
        return ranks

    @functools.cached_property
    def class_probabilities(self) -> np.ndarray:
        """float64 [C]: the law each region's class follows (``zipf_probabilities``)."""
        return zipf_probabilities(self.class_ranks, self.zipf_exponent)

    @functools.cached_property
    def _zipf_plan(self) -> tuple[np.ndarray, np.ndarray]:
        """Long-tailed mode: (first slot of each example int64 [N + 1], class of each slot)."""
        lo, hi = self.regions_range
        counts = np.random.default_rng([self.seed, self._split_key, 2]).integers(
            lo, hi + 1, self.num_examples
        )
        starts = np.concatenate([[0], np.cumsum(counts)])
        quota = region_quota(self.class_probabilities, int(starts[-1]))
        slots = np.repeat(np.arange(self.num_classes), quota)
        np.random.default_rng([self.seed, self._split_key, 3]).shuffle(slots)
        return starts, slots

    @property
    def region_quota(self) -> np.ndarray:
        """int64 [C]: regions of each class in this split (long-tailed mode only).

        Raises:
          ValueError: with ``zipf_exponent = 0`` (the balanced mode has no fixed quota).
        """
        if self.zipf_exponent == 0:
            raise ValueError("region_quota exists only with zipf_exponent > 0")
        return np.bincount(self._zipf_plan[1], minlength=self.num_classes)

    @functools.cached_property
    def class_names(self) -> tuple[str, ...]:
        return class_names(self.num_classes)

    @functools.cached_property
    def palette(self) -> np.ndarray:
        return make_palette(self.num_classes)

    def _rng(self, index: int) -> np.random.Generator:
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} out of range for {self.num_examples} examples")
        return np.random.default_rng([self.seed, self._split_key, index])

    def _block_permutation(self, block: int) -> np.ndarray:
        """The class order of slot block ``block`` (a permutation of the C classes)."""
        permutation = self._permutations.get(block)  # safe under grain's reader threads
        if permutation is None:
            rng = np.random.default_rng([self.seed, self._split_key, 1, block])
            permutation = rng.permutation(self.num_classes)
            if len(self._permutations) >= 4:
                self._permutations.clear()
            self._permutations[block] = permutation
        return permutation

    def _region_classes(self, index: int, k: int) -> np.ndarray:
        """Classes of the ``k`` regions of example ``index``.

        Example ``i`` owns the slots ``i * max_regions ...`` of one long sequence of classes that
        runs through a fresh random permutation of all C classes every C slots. Each class is
        thus drawn uniformly but far more evenly than by independent draws: in ``n`` examples
        every class gets about ``n * max_regions / C`` slots, of which a fraction
        ``mean_regions / max_regions`` is used.
        """
        slots = index * self.regions_range[1] + np.arange(k)
        blocks, offsets = np.divmod(slots, self.num_classes)
        return np.asarray(
            [self._block_permutation(int(b))[o] for b, o in zip(blocks, offsets, strict=True)]
        )

    def _layout(
        self, index: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Draws the regions: (region id int [H, W], void bool [H, W], class per region [K])."""
        h, w = self.image_size
        if self.zipf_exponent > 0:
            starts, slots = self._zipf_plan
            classes = slots[starts[index] : starts[index + 1]]
            k = len(classes)
        else:
            k = int(rng.integers(self.regions_range[0], self.regions_range[1] + 1))
        centres = rng.random((k, 2), dtype=np.float32) * np.asarray([h, w], np.float32)
        if self.zipf_exponent == 0:
            classes = self._region_classes(index, k)
        dy = np.arange(h, dtype=np.float32)[:, None]
        dx = np.arange(w, dtype=np.float32)[None, :]
        best = np.full((h, w), np.inf, np.float32)
        second = np.full((h, w), np.inf, np.float32)
        region = np.zeros((h, w), np.int32)
        for i, (cy, cx) in enumerate(centres):
            d = np.square(dy - cy) + np.square(dx - cx)  # squared distance to centre i
            closer = d < best
            second = np.where(closer, best, np.minimum(second, d))
            best = np.where(closer, d, best)
            region[closer] = i
        void = (np.sqrt(second) - np.sqrt(best)) < self._border
        return region, void, classes

    def region_classes(self, index: int) -> np.ndarray:
        """The class of each Voronoi region of example ``index`` (repeats kept; cheap)."""
        return self._layout(index, self._rng(index))[2]

    def image_classes(self, index: int) -> np.ndarray:
        """The sorted class ids present in example ``index`` (cheap: no texture is rendered).

        Used by repeat-factor sampling instead of decoding every label.
        """
        region, void, classes = self._layout(index, self._rng(index))
        return np.unique(classes[region[~void]])

    def __getitem__(self, index: int) -> dict[str, np.ndarray | str]:
        """Generates example ``index``.

        Returns:
          ``{"image": uint8 [H, W, 3], "label": uint16 or int32 [H, W], "file_name": str}``.
        """
        index = int(index)
        rng = self._rng(index)
        region, void, classes = self._layout(index, rng)
        h, w = self.image_size
        app = self._appearance
        k = len(classes)
        angle, period = app["angle"][classes], app["period"][classes]
        # Stripe phase in half periods, shifted positive so that truncation acts as floor.
        ys = np.arange(h, dtype=np.float32)[:, None]
        xs = np.arange(w, dtype=np.float32)[None, :]
        offset = rng.random(k, dtype=np.float32) * 2.0 + 2.0 * (h + w) / min(STRIPE_PERIODS_PX)
        half_periods = 2.0 / period
        phase = (xs * (np.cos(angle) * half_periods)[region]
                 + ys * (np.sin(angle) * half_periods)[region] + offset[region])  # fmt: skip
        stripe = phase.astype(np.int32) & 1
        # Look-up table: rows 0..K-1 colour a, K..2K-1 colour b, 2K the void grey.
        table = np.concatenate([app["color_a"][classes], app["color_b"][classes], [[128] * 3]])
        pixel_row = np.where(void, 2 * k, region + k * stripe)
        image = table.astype(np.int16)[pixel_row]
        # Mild noise: uniform per pixel (std noise_std) plus a global brightness offset.
        amplitude = int(round(self.noise_std * np.sqrt(3.0)))
        image += rng.integers(-amplitude, amplitude + 1, size=(h, w, 3), dtype=np.int16)
        image += np.int16(round(rng.normal(0.0, 2.0 * self.noise_std)))
        image = np.clip(image, 0, 255).astype(np.uint8)
        cls = classes[region]
        if self.num_classes <= STORED_VOID:
            label = np.where(void, STORED_VOID, cls).astype(np.uint16)
        else:
            label = np.where(void, IGNORE_INDEX, cls).astype(np.int32)
        return {"image": image, "label": label, "file_name": f"synthetic/{self.split}/{index:08d}"}
