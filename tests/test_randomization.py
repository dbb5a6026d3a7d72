"""Cascading model randomisation: maps that ignore a randomised part stay the same and fail."""

import torch
from helpers import images_for, tiny_vit

from lidc_cdam.evaluate.randomization import cascading_randomization, ssim


def test_attention_ignores_the_head_cdam_does_not():
    model = tiny_vit(torch.float32)
    x = images_for(model, batch=3).float()
    rows = cascading_randomization(model, x, [0, 3], ["attention", "cdam"], n_blocks=1, seed=0)
    by = {(r["method"], r["stage"]): r for r in rows}
    # the attention map does not read the head: identical after randomising it -> fails there
    assert by[("attention", "head")]["spearman"] == 1.0 and not by[("attention", "head")]["changed"]
    assert by[("attention", "head")]["ssim"] > 0.999
    assert by[("cdam", "head")]["changed"]
    # randomising the last block changes both
    assert by[("attention", "block -1")]["changed"] and by[("cdam", "block -1")]["changed"]
    # the trained model is left alone
    torch.testing.assert_close(model(x), tiny_vit(torch.float32)(x))


def test_ssim_bounds():
    a = torch.rand(8, 8, generator=torch.Generator().manual_seed(0))
    assert abs(ssim(a, a) - 1.0) < 1e-9
    assert ssim(a, 1 - a) < 0.0
