"""Augmented views: deterministic per (seed, path, view), view 0 is stage one's clean view, policies are named."""
from __future__ import annotations

import numpy as np
import pytest

from features.augment import AUGMENT_POLICIES, augment_view, get_policy, view_loader
from features.errors import UsageError
from features.images import decode_rgb, load_image

from conftest import write_images


@pytest.fixture
def photo(tmp_path):
    path = write_images(tmp_path, 1, seed=3, size=(120, 160))[0]
    return path, decode_rgb(path)


@pytest.mark.parametrize("policy", sorted(AUGMENT_POLICIES))
def test_a_view_depends_only_on_seed_path_and_index(photo, policy):
    _, img = photo
    view = augment_view(img, 64, policy, seed=0, path="train/a.jpg", view=1)
    assert view.shape == (64, 64, 3) and view.dtype == np.uint8
    np.testing.assert_array_equal(view, augment_view(img.copy(), 64, policy, seed=0, path="train/a.jpg", view=1))
    others = [augment_view(img, 64, policy, seed=s, path=p, view=v)
              for s, p, v in [(1, "train/a.jpg", 1), (0, "train/b.jpg", 1), (0, "train/a.jpg", 2)]]
    if policy != "flip":  # a flip-only policy has two possible views
        assert all(not np.array_equal(view, other) for other in others)


def test_view_zero_is_the_stage_one_clean_view(photo):
    path, img = photo
    np.testing.assert_array_equal(view_loader(64, "crop", 0.875, "standard", 0, 0)("x.jpg", img), load_image(path, 64, "crop"))


def test_standard_policy_changes_pixels(photo):
    _, img = photo
    clean = load_image(photo[0], 64, "crop").astype(int)
    views = np.stack([augment_view(img, 64, "standard", 0, "a.jpg", v) for v in range(1, 9)]).astype(int)
    assert all(np.abs(v - clean).mean() > 5 for v in views)  # crop, rotation and jitter move the pixels


def test_brightness_jitter_stays_within_20_percent_and_saturates_at_white():
    """On a flat image only brightness acts (crop, rotation, contrast and saturation keep it flat): 250 becomes
    200..255, clipped at 255 when brightened, never wrapped round to dark values as a bare uint8 cast would."""
    flat = np.full((120, 160, 3), 250, np.uint8)
    views = np.stack([augment_view(flat, 32, "standard", 0, "w.jpg", v) for v in range(1, 17)]).astype(int)
    assert views.min() >= 200 and (views == 255).all(axis=(1, 2, 3)).sum() >= 3
    assert len({v.min() for v in views}) > 8  # each view draws its own brightness


def test_unknown_policy_names_the_valid_ones():
    with pytest.raises(UsageError, match="augment policy 'strong' is not valid. Expected one of: standard, light, flip"):
        get_policy("strong")
