"""The one rule for showing an image slice (overlays, qualitative report figure)."""

import numpy as np
import pytest

from medseg.evaluation.display import display_slice


@pytest.mark.parametrize("channels, shape", [(1, (5, 6)), (2, (5, 6)), (3, (5, 6, 3)), (4, (5, 6))])
def test_any_channel_count_gives_a_grey_or_rgb_image_in_unit_range(channels, shape):
    """Regression: two-channel MR (nnU-Net `_0000`/`_0001`) made evaluate's overlay fail with (H, W, 2)."""
    rng = np.random.default_rng(channels)
    image = rng.normal(3.0, 2.0, size=(channels, 5, 6)).astype(np.float32)
    shown = display_slice(image)
    assert shown.shape == shape
    assert shown.min() == 0.0 and shown.max() == 1.0
    first = image[0] if channels != 3 else np.moveaxis(image, 0, -1)
    np.testing.assert_allclose(shown, (first - first.min()) / (first.max() - first.min()), rtol=1e-6)


def test_a_flat_slice_is_black_not_nan():
    assert not display_slice(np.full((1, 4, 4), 7.0)).any()
