import subprocess
import sys

import pytest
import torch

from aigc_ray.config import VALID_IMAGE_SIZES, ConfigError, ModelConfig
from aigc_ray.models import build_discriminator, build_generator
from aigc_ray.models.steps import StepContext, gan_step, vae_step


@pytest.mark.parametrize("family", ["dcgan", "wgan-gp", "seed-recipe", "vae", "ae"])
@pytest.mark.parametrize("size", VALID_IMAGE_SIZES)
@pytest.mark.parametrize("channels", [1, 3])
def test_every_family_builds_every_size(family, size, channels):
    cfg = ModelConfig(family=family, image_size=size, channels=channels, latent_dim=8, width=4)
    G, D = build_generator(cfg).eval(), build_discriminator(cfg)
    z = torch.randn(2, 8)
    if family in ("vae", "ae"):
        images = torch.rand(2, channels, size, size) * 2 - 1
        logits, mu, logvar = G(images)
        assert logits.shape == images.shape and mu.shape == (2, 8) and logvar.shape == (2, 8)
        assert G.decode(z).shape == (2, channels, size, size)
        assert D is None
    else:
        fake = G(z)
        assert fake.shape == (2, channels, size, size)
        assert fake.min() >= -1 and fake.max() <= 1  # tanh output, same range as the data
        assert D.eval()(fake).shape == (2,)  # one logit per image


@pytest.mark.parametrize("size", [4, 24, 48, 256])
def test_unbuildable_size_is_rejected_with_the_sizes_that_work(size):
    with pytest.raises(ConfigError, match=r"sizes that work: \(8, 16, 32, 64, 128\)"):
        ModelConfig(image_size=size)


def test_conditional_models_take_labels():
    cfg = ModelConfig(family="dcgan", image_size=16, latent_dim=8, width=4, num_classes=10)
    G, D = build_generator(cfg), build_discriminator(cfg)
    labels = torch.tensor([0, 9])
    assert D(G(torch.randn(2, 8), labels), labels).shape == (2,)
    with pytest.raises(ValueError, match="class-conditional"):
        G(torch.randn(2, 8))


def test_seed_recipe_matches_the_tutorial_at_28_like_sizes():
    # 16 px: dense 4x4x256 -> deconv 128 s1 -> 64 s2 -> C s2 (the tutorial's 7 -> 7 -> 14 -> 28)
    G = build_generator(ModelConfig(family="seed-recipe", image_size=16, latent_dim=100))
    assert G.project[0].out_features == 4 * 4 * 256
    assert [m.out_channels for m in G.net if isinstance(m, torch.nn.ConvTranspose2d)] == [128, 64, 1]


def test_vae_loss_falls_on_a_fixed_tiny_batch():
    torch.manual_seed(0)
    cfg = ModelConfig(family="vae", image_size=8, latent_dim=4, width=8)
    model = build_generator(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = (torch.rand(16, 1, 8, 8) > 0.5).float() * 2 - 1
    losses = [float(vae_step(model, opt, batch, StepContext(), 1.0, "bce", True)["loss"]) for _ in range(60)]
    assert losses[-1] < 0.8 * losses[0]
    assert all(torch.isfinite(torch.tensor(losses)))


def test_discriminator_learns_to_separate_a_fixed_batch_from_fakes():
    torch.manual_seed(0)
    cfg = ModelConfig(family="dcgan", image_size=8, latent_dim=8, width=8)
    G, D = build_generator(cfg), build_discriminator(cfg)
    opt_g = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=2e-3, betas=(0.5, 0.999))
    real = torch.rand(16, 1, 8, 8) * 2 - 1
    # D-only steps (update_g=False): its loss must fall, and G must not change
    before = [p.clone() for p in G.parameters()]
    losses = [float(gan_step(G, D, opt_g, opt_d, real, None, 8, StepContext(), update_g=False)["loss_d"])
              for _ in range(80)]
    assert sum(losses[-5:]) / 5 < 0.6 * losses[0]
    assert all(torch.equal(a, b) for a, b in zip(before, G.parameters()))


def test_generator_step_does_not_update_the_discriminator():
    """A full step (D, then G) leaves D where a D-only step from the same state leaves it: the G step
    neither steps D's optimizer nor leaves its loss's gradient in D's .grad, while G does move."""
    import copy

    cfg = ModelConfig(family="dcgan", image_size=8, latent_dim=8, width=8)
    torch.manual_seed(0)
    G, D = build_generator(cfg), build_discriminator(cfg)
    real = torch.rand(8, 1, 8, 8) * 2 - 1

    def step(update_g: bool):
        g, d = copy.deepcopy(G), copy.deepcopy(D)
        opt_g, opt_d = torch.optim.Adam(g.parameters(), lr=1e-2), torch.optim.Adam(d.parameters(), lr=1e-2)
        torch.manual_seed(1)  # the same latents in both runs
        out = gan_step(g, d, opt_g, opt_d, real, None, 8, StepContext(), update_g=update_g)
        return g, d, out

    g_full, d_full, out = step(update_g=True)
    g_d_only, d_only, _ = step(update_g=False)
    assert {"loss_d", "loss_g", "d_real", "d_fake"} <= set(out)
    assert not all(torch.equal(a, b) for a, b in zip(D.parameters(), d_only.parameters()))  # D's step moved D
    for full, alone in zip(d_full.parameters(), d_only.parameters()):
        assert torch.equal(full, alone)
        assert torch.equal(full.grad, alone.grad)  # no G-loss gradient left behind for D's next step
    assert not all(torch.equal(a, b) for a, b in zip(g_full.parameters(), g_d_only.parameters()))  # G's step moved G


def test_importing_models_does_not_import_ray():
    code = "import sys, aigc_ray.models, aigc_ray.models.checkpoint, aigc_ray.pipeline; assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
