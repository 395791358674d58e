"""Decoding what real folders contain: every odd format becomes RGB uint8, every bad file a skip with a reason."""
from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from features.augment import AUGMENT_POLICIES, augment_view, file_loader
from features.images import (MAX_PIXELS, NEEDED_SHORT, RESIZE_POLICIES, dct_scale, decode_rgb, decode_stream,
                             image_size, jpeg_size, load_image)
from tests.conftest import HYMENOPTERA, ODD_INPUTS

ODD = ODD_INPUTS
ODD_JPEGS = ["exif_rotated.jpg", "cmyk.jpg", "grayscale.jpg", "progressive.jpg", "large_4000x2328.jpg"]

# file -> mean absolute difference to the reference allowed (0 = lossless)
GOOD = {"reference_rgb.png": 0, "rgba.png": 0, "sixteen_bit.png": 0, "tiff.tif": 0, "bmp.bmp": 0,
        "exif_rotated.jpg": 3, "cmyk.jpg": 3, "webp.webp": 3, "progressive.jpg": 3, "UPPER_CASE_EXT.JPG": 3,
        "palette.gif": 25, "grayscale.jpg": 25}
BAD = ["truncated.jpg", "zero_bytes.jpg", "text_named.jpg", "html_named.jpeg", "random_bytes.png"]


@pytest.fixture(scope="module")
def odd() -> Path:
    return ODD


@pytest.fixture(scope="module")
def reference(odd: Path) -> np.ndarray:
    return np.asarray(Image.open(odd / "good" / "reference_rgb.png").convert("RGB"))


@pytest.mark.parametrize("name", sorted(GOOD))
def test_odd_good_inputs_decode_to_the_reference(odd, reference, name):
    img = decode_rgb(odd / "good" / name)
    assert img.dtype == np.uint8 and img.shape == reference.shape
    assert np.abs(img.astype(int) - reference).mean() <= GOOD[name]


def test_grayscale_is_replicated_to_three_equal_channels(odd):
    img = decode_rgb(odd / "good" / "grayscale.jpg")
    assert np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 1], img[..., 2])


def test_large_and_tiny_images_resize_close_to_the_reference(odd, reference):
    want = load_image(odd / "good" / "reference_rgb.png", 224, "crop").astype(int)
    large = load_image(odd / "good" / "large_4000x2328.jpg", 224, "crop").astype(int)
    assert np.abs(large - want).mean() < 4
    assert load_image(odd / "good" / "tiny_20x20.png", 224, "stretch").shape == (224, 224, 3)


@pytest.mark.parametrize("resize", sorted(RESIZE_POLICIES))
def test_load_image_equals_resizing_the_rgb_decode(odd, resize):
    """load_image resizes in BGR and flips last; the pixels must be those of resizing the RGB image, for every kind of
    file (JPEGs decoded DCT-scaled, a 16-bit PNG, a palette GIF, a tiny image enlarged, the shipped photos)."""
    files = sorted((odd / "good").iterdir()) + sorted(HYMENOPTERA.glob("*/*/*.jpg"))[:20]
    for size in (64, 224):
        for path in files:
            want = RESIZE_POLICIES[resize](decode_rgb(path, NEEDED_SHORT[resize](size)), size)
            assert np.array_equal(load_image(path, size, resize), want), (path.name, size)


@pytest.mark.parametrize("name", BAD)
def test_odd_bad_inputs_raise_with_a_reason(odd, name):
    with pytest.raises(ValueError, match="empty|not a decodable image"):
        decode_rgb(odd / "bad" / name)


def _rgb_gradient() -> np.ndarray:
    y, x = np.mgrid[0:60, 0:80]
    return np.stack([x * 3, y * 4, (x + y) * 2], axis=-1).astype(np.uint8)


def test_channel_order_is_rgb_not_opencv_bgr(tmp_path):
    rgb = _rgb_gradient()
    Image.fromarray(rgb).save(tmp_path / "g.png")
    assert np.array_equal(decode_rgb(tmp_path / "g.png"), rgb)


def test_generated_odd_formats(tmp_path):
    """The same checks on files made here from a synthetic gradient, where every pixel is known."""
    rgb = _rgb_gradient()
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "rgba.png")
    cv2.imwrite(str(tmp_path / "16bit.png"), (rgb[..., ::-1].astype(np.uint16) * 257))
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=98)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
    rotated = Image.fromarray(np.ascontiguousarray(np.rot90(rgb, k=1)))  # stored rotated 90° ccw ...
    exif = Image.Exif()
    exif[0x0112] = 6  # ... and tagged "rotate 90° cw to display"
    rotated.save(tmp_path / "exif.jpg", exif=exif, quality=98)
    assert np.array_equal(decode_rgb(tmp_path / "rgba.png"), rgb)
    assert np.array_equal(decode_rgb(tmp_path / "16bit.png"), rgb)
    assert np.abs(decode_rgb(tmp_path / "cmyk.jpg").astype(int) - rgb).mean() < 3
    assert np.array_equal(decode_rgb(tmp_path / "gray.png")[..., 1], rgb[..., 0])
    upright = decode_rgb(tmp_path / "exif.jpg")
    assert upright.shape == rgb.shape and np.abs(upright.astype(int) - rgb).mean() < 3


def test_generated_bad_files(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(_rgb_gradient()).save(buf, "JPEG")
    (tmp_path / "trunc.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "html.jpeg").write_text("<html>404 not found</html>")
    for name in ["trunc.jpg", "empty.jpg", "html.jpeg"]:
        with pytest.raises(ValueError):
            decode_rgb(tmp_path / name)


@pytest.mark.parametrize("policy", ["crop", "stretch"])
def test_resize_policies(tmp_path, policy):
    wide = np.zeros((100, 300, 3), np.uint8)
    wide[:, 100:200] = 255  # white centre third
    Image.fromarray(wide).save(tmp_path / "wide.png")
    out = load_image(tmp_path / "wide.png", 64, policy)
    assert out.shape == (64, 64, 3)
    white = (out[32, :, 0] > 128).mean()
    # crop keeps the aspect ratio: the centre third fills most of the square; stretch squeezes it to a third
    assert white > 0.8 if policy == "crop" else abs(white - 1 / 3) < 0.05


def test_decode_stream_keeps_order_and_reports_skips(tmp_path):
    good = tmp_path / "a.png"
    Image.fromarray(_rgb_gradient()).save(good)
    (tmp_path / "b.jpg").write_bytes(b"")
    items = [(i, good if i % 2 == 0 else tmp_path / "b.jpg") for i in range(20)]
    out = list(decode_stream(items, lambda path: load_image(path, 32, "stretch"), workers=4, lookahead=5))
    assert [d.index for d in out] == list(range(20))
    assert all((d.pixels is None) == (d.index % 2 == 1) for d in out)
    assert all(d.reason for d in out if d.pixels is None)


@pytest.mark.parametrize(("short", "min_short", "scale"), [
    (3024, 256, 8), (3024, 438, 4), (2048, 256, 8), (2047, 256, 8), (2040, 256, 4), (512, 256, 2), (511, 256, 2),
    (510, 256, 1), (356, 256, 1), (100, 256, 1), (291, 40, 4), (291, 37, 8), (291, 38, 4)])
def test_dct_scale_is_the_smallest_decode_that_keeps_the_short_side(short, min_short, scale):
    assert dct_scale(short, min_short) == scale  # libjpeg rounds scaled sizes up: 2047 / 8 -> 256


def test_jpeg_size_reads_the_stored_frame_size_and_declines_other_bytes(tmp_path):
    for name in ODD_JPEGS:
        path = ODD / "good" / name
        with Image.open(path) as im:
            assert jpeg_size(np.fromfile(path, np.uint8)) == (im.height, im.width)  # stored, before EXIF orientation
    assert jpeg_size(np.fromfile(ODD / "good" / "reference_rgb.png", np.uint8)) is None
    assert jpeg_size(np.frombuffer(b"\xff\xd8\xff\xe0\x00", np.uint8)) is None  # header cut short


@pytest.mark.parametrize("name", ODD_JPEGS)
@pytest.mark.parametrize("min_short", [40, 100, 291])
def test_scaled_decode_is_the_full_decode_shrunk(name, min_short):
    """Same orientation (EXIF applied), the scaled shape, the same pixels as the full decode area-shrunk to it."""
    full = decode_rgb(ODD / "good" / name)
    small = decode_rgb(ODD / "good" / name, min_short)
    scale = dct_scale(min(full.shape[:2]), min_short)
    assert small.shape == (-(-full.shape[0] // scale), -(-full.shape[1] // scale), 3)
    assert min(small.shape[:2]) >= min_short
    shrunk = cv2.resize(full, small.shape[1::-1], interpolation=cv2.INTER_AREA)
    assert np.abs(shrunk.astype(int) - small).mean() < 1.0  # measured: at most 0.96


@pytest.mark.parametrize("name", ODD_JPEGS)
@pytest.mark.parametrize(("size", "resize"), [(64, "crop"), (112, "crop"), (112, "stretch"), (224, "crop")])
def test_load_image_stays_close_to_the_full_resolution_path(name, size, resize):
    full_path = RESIZE_POLICIES[resize](decode_rgb(ODD / "good" / name), size).astype(int)
    # measured: at most 2.8 (112 crop: the resized width rounds one pixel differently, shifting the crop by one)
    assert np.abs(load_image(ODD / "good" / name, size, resize) - full_path).mean() < 3.0


def test_images_under_twice_the_needed_side_get_the_pixels_of_a_full_decode_area_shrunk(tmp_path):
    """No DCT scale applies below 2x, and what remains is area-shrunk as before scaled decoding existed, so caches
    of web-size photos keep their pixels (and a linear probe its predictions)."""
    photo = cv2.imread(str(ODD / "good" / "progressive.jpg"))
    for short in (300, 500):  # crop at 224 needs 256: a 1.17x and a 1.95x shrink
        path = tmp_path / f"{short}.jpg"
        cv2.imwrite(str(path), cv2.resize(photo, (short * 4 // 3, short), interpolation=cv2.INTER_AREA))
        full = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        shrunk = cv2.resize(full, (round(256 * 4 / 3), 256), interpolation=cv2.INTER_AREA)
        left = (shrunk.shape[1] - 224) // 2
        assert np.array_equal(load_image(path, 224, "crop"), shrunk[16:240, left:left + 224]), short


def test_scaled_decode_keeps_bad_files_bad():
    with pytest.raises(ValueError, match="not a decodable image"):
        decode_rgb(ODD / "bad" / "truncated.jpg", 40)


def test_grayscale_scaled_decode_has_three_equal_channels():
    img = decode_rgb(ODD / "good" / "grayscale.jpg", 100)
    assert np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 1], img[..., 2])


@pytest.mark.parametrize("policy", sorted(AUGMENT_POLICIES))
def test_file_loader_views_match_views_of_the_full_decode(policy):
    """Augmented views decode small only down to the policy's smallest crop: they stay close to full-size views."""
    path = ODD / "good" / "large_4000x2328.jpg"
    full = decode_rgb(path)
    np.testing.assert_array_equal(file_loader(224, "crop", policy, 0, 0)("a.jpg", path), load_image(path, 224, "crop"))
    for view in (1, 2):
        small = file_loader(224, "crop", policy, 0, view)("a.jpg", path).astype(int)
        assert np.abs(small - augment_view(full, 224, policy, 0, "a.jpg", view)).mean() < 1.0  # measured: <= 0.7


def test_policy_min_short_leaves_the_smallest_crop_its_size():
    assert [AUGMENT_POLICIES[p].min_short(224) for p in ("standard", "light", "flip")] == [438, 334, 256]


@pytest.mark.parametrize(("fmt", "mode", "options"), [
    ("PNG", "RGB", {}), ("JPEG", "RGB", {}), ("GIF", "RGB", {}), ("BMP", "RGB", {}), ("TIFF", "RGB", {}),
    ("TIFF", "RGB", {"compression": "tiff_lzw"}), ("TIFF", "RGB", {"big_tiff": True}), ("WEBP", "RGB", {"quality": 80}),
    ("WEBP", "RGB", {"lossless": True}), ("WEBP", "RGBA", {"quality": 80})])  # RGBA WebP: the extended (VP8X) header
def test_image_size_reads_the_header_of_every_format_we_decode(fmt, mode, options):
    buf = io.BytesIO()
    Image.fromarray(_rgb_gradient()[:, :77]).convert(mode).save(buf, fmt, **options)
    data = np.frombuffer(buf.getvalue(), np.uint8)
    assert image_size(data) == (60, 77)
    assert image_size(data[:9]) is None  # a header cut short (a GIF's ends at byte 10)


def test_image_size_of_the_odd_inputs_is_pillows_and_bad_files_have_none():
    for path in sorted((ODD / "good").iterdir()):
        with Image.open(path) as im:
            assert image_size(np.fromfile(path, np.uint8)) == (im.height, im.width), path.name
    assert all(image_size(np.fromfile(ODD / "bad" / name, np.uint8)) is None for name in BAD if name != "truncated.jpg")


def test_max_pixels_refuses_larger_images_from_the_header(tmp_path):
    assert MAX_PIXELS == Image.MAX_IMAGE_PIXELS  # the default: Pillow's limit
    Image.fromarray(_rgb_gradient()).save(tmp_path / "g.png")  # 80 x 60 = 4800 pixels
    assert decode_rgb(tmp_path / "g.png", max_pixels=4800).shape == (60, 80, 3)
    with pytest.raises(ValueError, match=r"^80x60 is 4,800 pixels, more than --max-pixels 4799; not decoded"):
        decode_rgb(tmp_path / "g.png", max_pixels=4799)
    with pytest.raises(ValueError, match=r"--max-pixels 4799.*Raise MAX_PIXELS"):
        file_loader(32, "crop", "standard", 0, 1, max_pixels=4799)("g.png", tmp_path / "g.png")
    large = ODD / "good" / "large_4000x2328.jpg"  # a JPEG counts its stored pixels, also when decoded DCT-scaled
    with pytest.raises(ValueError, match="4000x2328 is 9,312,000 pixels"):
        load_image(large, 64, "crop", max_pixels=4000 * 2328 - 1)
    assert load_image(large, 64, "crop", max_pixels=4000 * 2328).shape == (64, 64, 3)
