"""YCbCr conversion and chroma resampling (study.data.color)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from study.data.color import (
    LOG_ABS_DET,
    downsample_chroma,
    merge_for_display,
    rgb_to_ycbcr,
    rgb_to_ycbcr_uint8,
    split_ycbcr,
    upsample_chroma,
    ycbcr_to_rgb,
    ycbcr_to_rgb_uint8,
)
from tests.conftest import SAMPLE

REAL_IMAGE = SAMPLE / "img_align_celeba" / "000001.jpg"


@pytest.fixture(scope="module")
def real_rgb() -> np.ndarray:
    """uint8 (218, 178, 3) aligned CelebA image."""
    with Image.open(REAL_IMAGE) as im:
        return np.array(im.convert("RGB"))


def _to_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img).permute(2, 0, 1)[None].double() / 255.0  # (1, 3, H, W)


def test_round_trip_random() -> None:
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(ycbcr_to_rgb(rgb_to_ycbcr(x)), x, atol=1e-12)
    # float32 round trip is well within one grey level
    x32 = x.float()
    assert (ycbcr_to_rgb(rgb_to_ycbcr(x32)) - x32).abs().max() < 1 / 255


def test_round_trip_real(real_rgb: np.ndarray) -> None:
    x = _to_tensor(real_rgb).float()
    assert (ycbcr_to_rgb(rgb_to_ycbcr(x)) - x).abs().max() < 1 / 255


def test_leading_dims_and_range() -> None:
    x = torch.rand(2, 5, 3, 4, 4, dtype=torch.float64)
    y = rgb_to_ycbcr(x)
    assert y.shape == x.shape
    assert y.min() >= 0 and y.max() <= 1
    assert torch.allclose(y[1, 2], rgb_to_ycbcr(x[1, 2]))


@pytest.mark.parametrize(
    ("rgb", "ycc"),
    [
        ((0, 0, 0), (0.0, 0.5, 0.5)),
        ((1, 1, 1), (1.0, 0.5, 0.5)),
        ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ((1, 0, 0), (0.299, 0.5 - 0.168736, 1.0)),
        ((0, 1, 0), (0.587, 0.5 - 0.331264, 0.5 - 0.418688)),
        ((0, 0, 1), (0.114, 1.0, 0.5 - 0.081312)),
    ],
)
def test_pure_colours(rgb: tuple[float, ...], ycc: tuple[float, ...]) -> None:
    x = torch.tensor(rgb, dtype=torch.float64).view(1, 3, 1, 1)
    assert torch.allclose(rgb_to_ycbcr(x).flatten(), torch.tensor(ycc, dtype=torch.float64), atol=1e-12)


def test_matches_pil(real_rgb: np.ndarray) -> None:
    with Image.open(REAL_IMAGE) as im:
        pil = np.asarray(im.convert("RGB").convert("YCbCr")).astype(np.float64)  # (H, W, 3)
    ours = rgb_to_ycbcr(_to_tensor(real_rgb))[0].permute(1, 2, 0).numpy() * 255.0
    # PIL rounds a fixed-point (14-bit) version of the same JFIF matrix: within one grey level once rounded,
    # and unbiased on average
    assert np.abs(np.rint(ours) - pil).max() <= 1.0
    assert np.abs(ours - pil).max() < 1.1
    assert np.abs((ours - pil).mean(axis=(0, 1))).max() < 0.5
    ours_u8 = rgb_to_ycbcr_uint8(real_rgb).astype(np.int16)
    assert np.abs(ours_u8 - pil).max() <= 1


def test_uint8_round_trip(real_rgb: np.ndarray) -> None:
    back = ycbcr_to_rgb_uint8(rgb_to_ycbcr_uint8(real_rgb[None]))  # (1, H, W, 3)
    # two roundings of 8-bit YCbCr: a few grey levels at most
    assert np.abs(back.astype(np.int16) - real_rgb[None]).max() <= 3
    with pytest.raises(ValueError):
        rgb_to_ycbcr_uint8(real_rgb.astype(np.float32))


def test_log_abs_det() -> None:
    jac = torch.autograd.functional.jacobian(
        lambda v: rgb_to_ycbcr(v.view(1, 3, 1, 1)).flatten(), torch.rand(3, dtype=torch.float64)
    )
    assert np.isclose(torch.linalg.slogdet(jac).logabsdet.item(), LOG_ABS_DET)


def test_downsample_is_block_mean() -> None:
    c = torch.rand(3, 2, 64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    down = downsample_chroma(c, 4)
    assert down.shape == (3, 2, 16, 16)
    ref = c.numpy().reshape(3, 2, 16, 4, 16, 4).mean(axis=(3, 5))
    np.testing.assert_allclose(down.numpy(), ref, atol=1e-12)


def test_downsample_rejects_indivisible() -> None:
    with pytest.raises(ValueError, match="divisible"):
        downsample_chroma(torch.rand(1, 2, 30, 32), 4)
    with pytest.raises(ValueError):
        downsample_chroma(torch.rand(1, 2, 32, 32), 0)


def test_upsample_modes() -> None:
    c = torch.rand(2, 2, 16, 16, dtype=torch.float64)
    up = upsample_chroma(c, 4)
    assert up.shape == (2, 2, 64, 64)
    # nearest is the exact right inverse of area downsampling
    assert torch.allclose(downsample_chroma(up, 4), c)
    bil = upsample_chroma(c, 4, mode="bilinear")
    assert bil.shape == (2, 2, 64, 64)
    flat = torch.full((1, 2, 4, 4), 0.3)
    assert torch.allclose(upsample_chroma(flat, 4, mode="bilinear"), torch.full((1, 2, 16, 16), 0.3))
    with pytest.raises(ValueError):
        upsample_chroma(c, 4, mode="bicubic")  # type: ignore[arg-type]


def test_split_and_merge(real_rgb: np.ndarray) -> None:
    # a 64x64 crop of a real face: Dorta et al.'s 64 -> (64, 16) layout
    x = _to_tensor(real_rgb[80:144, 57:121]).float()
    y, cbcr = split_ycbcr(x, 4)
    assert y.shape == (1, 1, 64, 64) and cbcr.shape == (1, 2, 16, 16)
    rgb = merge_for_display(y, cbcr)
    assert rgb.shape == (1, 3, 64, 64) and rgb.min() >= 0 and rgb.max() <= 1
    # only chroma detail is lost: luminance of the merged image is close to the original's
    y_back = rgb_to_ycbcr(rgb)[:, :1]
    assert (y_back - y).abs().mean() < 0.01
    # with factor 1 nothing is lost
    y1, c1 = split_ycbcr(x, 1)
    assert (merge_for_display(y1, c1) - x).abs().max() < 1 / 255
    with pytest.raises(ValueError):
        merge_for_display(y, cbcr[:, :1])


def test_to_storage_layouts_on_a_real_image():
    """rgb unchanged; grey = rounded Y; ycbcr = Y plus chroma block means at 1/4 resolution (numpy reference)."""
    import numpy as _np
    from PIL import Image as _Image

    from study.data.color import to_storage

    path = "data/sample/celeba/img_align_celeba/000001.jpg"
    img = _np.asarray(_Image.open(path).convert("RGB").resize((64, 64)))[None]  # (1, 64, 64, 3)
    assert to_storage(img, "rgb")[""] is img
    rgb = img.astype(_np.float64)
    y = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    # Offset 0.5 in [0, 1] units (127.5 on the 8-bit scale, half a level below JFIF's 128) so that stored
    # values / 255 are exactly the library's float YCbCr.
    cb = 127.5 - 0.168736 * rgb[..., 0] - 0.331264 * rgb[..., 1] + 0.5 * rgb[..., 2]
    cr = 127.5 + 0.5 * rgb[..., 0] - 0.418688 * rgb[..., 1] - 0.081312 * rgb[..., 2]
    grey = to_storage(img, "grey")
    assert set(grey) == {""} and grey[""].shape == (1, 64, 64, 1)
    assert _np.abs(grey[""][..., 0].astype(float) - y).max() <= 0.5 + 1e-9
    ycc = to_storage(img, "ycbcr", 4)
    assert ycc["_chroma"].shape == (1, 16, 16, 2) and ycc["_chroma"].dtype == _np.uint8
    block = _np.stack([cb, cr], -1).reshape(1, 16, 4, 16, 4, 2).mean(axis=(2, 4))
    assert _np.abs(ycc["_chroma"].astype(float) - block).max() <= 0.5 + 1e-9
