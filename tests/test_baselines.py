"""Gradient baselines equal captum / pytorch-grad-cam on the same inputs (docs/method.md, "Baselines")."""

import numpy as np
import pytest
import torch
from captum.attr import InputXGradient, IntegratedGradients, NoiseTunnel, Saliency
from helpers import images_for, reg4_dinov2_like, tiny_vit
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from lidc_cdam import METHODS, explain

GRADIENT_METHODS = ["input-x-grad", "smoothgrad", "intgrad", "gradcam", "cdam", "smooth-cdam", "integrated-cdam"]


def test_input_x_grad_equals_captum():
    model = tiny_vit()
    x = images_for(model, batch=3)
    attr = explain(model, x, [2, 6], method="input-x-grad")
    assert attr.kind == "pixels" and attr.maps.shape == (3, 2, 32, 32)
    for k, t in enumerate([2, 6]):
        expected = InputXGradient(model).attribute(x, target=t).mean(1)
        torch.testing.assert_close(attr.maps[:, k], expected, rtol=1e-9, atol=1e-12)


def test_intgrad_equals_captum_riemann_right():
    model = tiny_vit()
    x = images_for(model, batch=2)
    attr = explain(model, x, [1, 3], method="intgrad", chunk_bytes=1)  # one path point per pass
    for k, t in enumerate([1, 3]):
        ig = IntegratedGradients(model).attribute(x, baselines=0.0, target=t, n_steps=50, method="riemann_right")
        # captum draws its alphas with float32 linspace: agreement to ~1e-6 relative
        torch.testing.assert_close(attr.maps[:, k], ig.mean(1), rtol=1e-5, atol=1e-8)


def test_smoothgrad_equals_captum_noise_tunnel():
    """Same noise: both draw N(0, std^2) from torch's global generator, n samples of one image
    (in float32: captum draws its noise in the default dtype)."""
    model = tiny_vit(torch.float32)
    x = images_for(model, batch=1)
    std = 0.15 * (x.max() - x.min()).item()
    torch.manual_seed(5)
    ours = explain(model, x, [4], method="smoothgrad", n=12, seed=None)
    torch.manual_seed(5)
    nt = NoiseTunnel(Saliency(model)).attribute(x, nt_type="smoothgrad", nt_samples=12, stdevs=std, target=4,
                                                abs=False)
    torch.testing.assert_close(ours.maps[:, 0], nt.mean(1), rtol=1e-4, atol=1e-6)


class RawGradCAM(GradCAM):
    """pytorch-grad-cam's GradCAM, stopped before its ReLU and min-max scaling."""

    def compute_cam_per_layer(self, input_tensor, targets, eigen_smooth):
        acts = self.activations_and_grads.activations[0].cpu().numpy()
        grads = self.activations_and_grads.gradients[0].cpu().numpy()
        return self.get_cam_image(input_tensor, self.target_layers[0], targets, acts, grads, eigen_smooth)

    def aggregate_multi_layers(self, cam):
        return cam


@pytest.mark.parametrize("build", [tiny_vit, reg4_dinov2_like], ids=["cls", "reg4"])
def test_gradcam_equals_pytorch_grad_cam_before_relu(build):
    model = build()
    x = images_for(model, batch=2)
    p, (gh, gw) = model.num_prefix_tokens, model.layout().grid

    def to_map(t):
        return t[:, p:].reshape(t.shape[0], gh, gw, -1).permute(0, 3, 1, 2)

    attr = explain(model, x, [0, 5], method="gradcam")
    for k, t in enumerate([0, 5]):
        with RawGradCAM(model, [model.last_block.norm1], reshape_transform=to_map) as cam:
            raw = cam(x, [ClassifierOutputTarget(t)] * 2)
        np.testing.assert_allclose(attr.maps[:, k].numpy(), np.maximum(raw, 0), rtol=1e-8, atol=1e-12)
        assert (raw < 0).any(), "the comparison must cover the ReLU"


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_gradient_methods_change_with_the_target_and_batch_targets_exactly(method):
    model = tiny_vit()
    x = images_for(model, batch=2)
    options = {"seed": 0} if "seed" in METHODS[method].defaults else {}
    together = explain(model, x, [1, 4], method=method, **options)
    assert not torch.allclose(together.maps[:, 0], together.maps[:, 1])
    alone = explain(model, x, [4], method=method, **options)
    torch.testing.assert_close(together.maps[:, 1], alone.maps[:, 0], rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("method", ["smoothgrad", "intgrad"])
def test_sample_chunking_does_not_change_results(method):
    model = tiny_vit()
    x = images_for(model, batch=3)
    options = {"n": 6, **({"seed": 1} if method == "smoothgrad" else {})}
    whole = explain(model, x, [2], method=method, **options)
    chunked = explain(model, x, [2], method=method, chunk_bytes=1, **options)
    torch.testing.assert_close(whole.maps, chunked.maps, rtol=1e-9, atol=1e-12)
    assert whole.upsample().shape == (3, 1, 32, 32)
