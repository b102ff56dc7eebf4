"""The small-data recipes: DiffAugment, the sngan family (spectral norm, hinge, R1), the VAE's
learned-variance likelihood and fitted prior. Pure torch, tiny shapes, no Ray."""

import copy

import pytest
import torch
from torch import nn

from aigc_ray.config import ConfigError, ModelConfig, load_config
from aigc_ray.models import get_family
from aigc_ray.models.diffaugment import cutout, diff_augment, translation
from aigc_ray.models.registry import TrainNets
from aigc_ray.models.steps import StepContext, gan_step, hinge_step, vae_step, wgan_gp_step
from aigc_ray.models.vae import PRIOR_MOMENTUM


def test_diffaugment_keeps_shape_and_passes_gradients_to_the_images():
    x = (torch.rand(4, 3, 16, 16) * 2 - 1).requires_grad_(True)
    y = diff_augment(x, "translation,cutout,color")
    assert y.shape == x.shape
    y.square().sum().backward()
    assert x.grad.abs().sum() > 0  # differentiable: G is trained through it


def test_translation_moves_content_by_at_most_an_eighth_and_fills_with_background():
    x = torch.full((64, 1, 16, 16), -1.0)
    x[:, :, 8, 8] = 1.0
    y = translation(x)
    assert set(y.unique().tolist()) <= {-1.0, 1.0}  # integer shifts: no interpolation
    where = (y[:, 0] == 1).nonzero()[:, 1:]  # (row, col) of the bright pixel, per image
    assert len(where) == 64 and (where - 8).abs().max() <= 2  # 16 px / 8
    assert len({tuple(w) for w in where.tolist()}) > 5  # each image its own shift


def test_cutout_blanks_one_square_of_half_the_side_per_image():
    y = cutout(torch.ones(256, 1, 16, 16))
    blanked = (y == 0).flatten(1).sum(1)
    assert blanked.max() == 64 and blanked.min() >= 16  # 8x8, clipped at the border at worst to 4x4
    assert (blanked == 64).any()


def test_diffaugment_draws_from_torchs_default_generator():
    # no private CPU generator: seeding torch reproduces it, and consecutive calls differ
    x = torch.rand(8, 3, 16, 16) * 2 - 1
    torch.manual_seed(3)
    a, b = diff_augment(x, "translation,cutout,color"), diff_augment(x, "translation,cutout,color")
    torch.manual_seed(3)
    assert torch.equal(diff_augment(x, "translation,cutout,color"), a) and not torch.equal(a, b)
    assert torch.equal(diff_augment(x, ""), x)


@pytest.mark.parametrize("family", ["dcgan", "sngan", "wgan-gp"])
def test_bad_diffaugment_policy_is_a_config_error_naming_the_field(family):
    with pytest.raises(ConfigError, match=r"model.options.diffaugment='flip'.*unknown DiffAugment op"):
        ModelConfig(family=family, options={"diffaugment": "flip"})


def test_diffaugment_means_nothing_for_the_vae_nor_the_seed_recipe():
    for family in ("vae", "seed-recipe"):
        with pytest.raises(ConfigError, match="families that take it: dcgan, sngan, wgan-gp"):
            ModelConfig(family=family, options={"diffaugment": "color"})


class _Recorder(nn.Module):
    """A critic that remembers every batch it is shown."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.seen: list[torch.Tensor] = []

    def forward(self, images, labels=None):
        self.seen.append(images.detach().clone())
        return images.flatten(1).mean(1) * self.w


class _Const(nn.Module):
    """A 'generator' drawing grey-ish noise (never exactly 0)."""

    def __init__(self):
        super().__init__()
        self.b = nn.Parameter(torch.full((1, 1, 8, 8), 0.5))

    def forward(self, z, labels=None):
        return self.b.expand(z.shape[0], -1, -1, -1) + 0.0 * z.sum()


@pytest.mark.parametrize("step", ["gan", "hinge", "wgan"])
def test_every_image_the_discriminator_sees_is_augmented_real_and_fake_in_both_steps(step):
    G, D = _Const(), _Recorder()
    opt_g, opt_d = torch.optim.SGD(G.parameters(), lr=0.1), torch.optim.SGD(D.parameters(), lr=0.1)
    real = torch.ones(6, 1, 8, 8)  # never 0: a 0 can only come from cutout
    if step == "gan":
        gan_step(G, D, opt_g, opt_d, real, None, 4, StepContext(), True, ("cutout",))
    elif step == "hinge":
        hinge_step(G, D, opt_g, opt_d, real, None, 4, StepContext(), True, ("cutout",), r1_gamma=1.0)
    else:
        wgan_gp_step(G, D, opt_g, opt_d, real, None, 4, StepContext(), 1.0, True, ("cutout",))
    assert len(D.seen) >= 2  # D's step and G's step
    if step == "wgan":  # the critic's batch is [real, fake, interpolates]: the last third mixes two cutouts
        D.seen[0] = D.seen[0][:12]
    for batch in D.seen:
        zeros = (batch == 0).flatten(1).sum(1)
        assert (zeros >= 4).all(), "an image reached D without the augmentation"


def _train(family: str, steps: int, **options):
    cfg = ModelConfig(family=family, image_size=8, latent_dim=8, width=8, options=options)
    fam = get_family(family)
    torch.manual_seed(0)
    G, D = fam.build(cfg)
    train = load_config(None).train
    nets = TrainNets(G, D, torch.optim.Adam(G.parameters(), 2e-3, betas=(0.5, 0.999)),
                     None if D is None else torch.optim.Adam(D.parameters(), 2e-3, betas=(0.5, 0.999)), cfg, train)
    batch = (torch.rand(32, 1, 8, 8) > 0.5).float() * 2 - 1
    return fam, nets, [fam.train_step(nets, batch, None, StepContext(), True) for _ in range(steps)], batch


def test_sngan_discriminator_is_spectrally_normalised_and_learns_with_the_hinge_loss():
    fam, nets, history, _ = _train("sngan", 25, diffaugment="")
    assert history[-1]["d_real"] > history[-1]["d_fake"]  # real scored above fake
    assert history[-1]["loss_d"] < history[0]["loss_d"]
    nets.D.eval()
    for module in nets.D.modules():
        if isinstance(module, nn.Conv2d):  # the largest singular value of each weight ~ 1
            sigma = torch.linalg.matrix_norm(module.weight.detach().flatten(1), ord=2)
            assert 0.8 < float(sigma) < 1.2
    assert "parametrizations.weight.original" in "".join(nets.D.state_dict())


def test_sngan_r1_is_reported_and_switches_double_backward_on():
    fam, _, history, _ = _train("sngan", 2, r1_gamma=1.0)
    assert float(history[-1]["r1"]) > 0
    assert fam.needs_double_backward(ModelConfig(family="sngan", options={"r1_gamma": 1.0}))
    assert not fam.needs_double_backward(ModelConfig(family="sngan"))
    with pytest.raises(ConfigError, match="model.options.r1_gamma must be a number >= 0"):
        ModelConfig(family="sngan", options={"r1_gamma": -1})


def test_sngan_is_class_conditional_with_a_projection_discriminator():
    cfg = ModelConfig(family="sngan", image_size=16, latent_dim=8, width=4, num_classes=3)
    G, D = get_family("sngan").build(cfg)
    labels = torch.tensor([0, 2])
    assert D(G(torch.randn(2, 8), labels), labels).shape == (2,)
    with pytest.raises(ValueError, match="class-conditional"):
        D(torch.zeros(2, 1, 16, 16))


def test_vae_learned_variance_loss_falls():
    _, _, history, _ = _train("vae", 25, recon_loss="sigma")
    assert float(history[-1]["loss"]) < float(history[0]["loss"])
    with pytest.raises(ConfigError, match="model.options.recon_loss='sigma' is unknown"):
        ModelConfig(family="ae", options={"recon_loss": "sigma"})


def test_vae_fitted_prior_tracks_the_encoded_training_images_and_samples_through_it():
    fam, nets, _, batch = _train("vae", 3, prior="fitted")
    model = nets.G
    before_mean, before_cov = model.prior_mean.clone(), model.prior_cov.clone()
    with torch.no_grad():
        mu, logvar = model.encode(batch)  # BatchNorm in train mode: the same statistics forward() sees
        model(batch)  # a training-mode forward updates the running moments
    # moment matching of the aggregate posterior: mean E[mu], covariance Cov(mu) + E[diag(var)]
    cov = torch.cov(mu.T) + torch.diag(logvar.exp().mean(0))
    assert torch.allclose(model.prior_mean, before_mean.lerp(mu.mean(0), PRIOR_MOMENTUM), atol=1e-5)
    assert torch.allclose(model.prior_cov, before_cov.lerp(cov, PRIOR_MOMENTUM), atol=1e-4)
    assert torch.allclose(model.prior_scale @ model.prior_scale.T, model.prior_cov, atol=1e-4)
    model.eval()
    z = torch.randn(4, 8)
    expected = model.decode(model.prior_mean + z @ model.prior_scale.T)
    assert torch.allclose(fam.sample(model, z, None), expected)
    settled = model.prior_mean.clone()
    with torch.no_grad():
        model(batch)  # eval mode: the prior stays put (reconstruction and evaluation don't move it)
    assert torch.equal(model.prior_mean, settled)
    # the prior travels with the weights: a model rebuilt from the config loads them
    rebuilt, _ = fam.build(nets.model)
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(rebuilt.prior_scale, model.prior_scale)
    with pytest.raises(ConfigError, match="model.options.prior='flat' is unknown"):
        ModelConfig(family="vae", options={"prior": "flat"})


def test_vae_step_with_the_standard_prior_keeps_old_checkpoints_loadable():
    cfg = ModelConfig(family="vae", image_size=8, latent_dim=4, width=8)
    model, _ = get_family("vae").build(cfg)
    assert not any(k.startswith("prior_") for k in model.state_dict())  # same keys as before the option
    out = vae_step(model, torch.optim.Adam(model.parameters()), torch.zeros(4, 1, 8, 8), StepContext(), 1.0, "bce", True)
    assert set(out) == {"loss", "recon", "kl"}


def test_vae_mixture_prior_finds_the_modes_of_the_encodings_and_samples_them_by_weight():
    from aigc_ray.models.vae import VAE

    model = VAE(8, 1, 2, 8, mixture_components=3)
    centres = torch.tensor([[-6.0, 0.0], [0.0, 6.0], [6.0, 0.0]])
    share = torch.tensor([0.5, 0.3, 0.2])
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):  # online hard EM on three well-separated clusters of posterior means
        which = torch.multinomial(share, 64, replacement=True, generator=gen)
        mu = centres[which] + 0.3 * torch.randn(64, 2, generator=gen)
        model._track_mixture(mu, torch.full((64, 2), -6.0))
    weights = model.mix_count / model.mix_count.sum()
    means = model.mix_sum / model.mix_count[:, None]
    order = torch.cdist(centres, means).argmin(1)  # the component that found each centre
    assert sorted(order.tolist()) == [0, 1, 2]
    assert torch.allclose(means[order], centres, atol=0.2)
    assert torch.allclose(weights[order], share, atol=0.05)
    # samples: seeds stay seeds, each component drawn by its weight, spread by its covariance
    z = torch.randn(6000, 2, generator=gen)
    latents = model._mixture_latents(z)
    assert torch.equal(latents, model._mixture_latents(z))
    drawn = torch.cdist(latents, centres).argmin(1)
    assert torch.allclose(torch.bincount(drawn, minlength=3) / 6000.0, share, atol=0.03)
    assert 0.2 < float(latents[drawn == 0].std(0).mean()) < 0.5
    for bad in (0, 65, 2.5):
        with pytest.raises(ConfigError, match="model.options.mixture_components"):
            ModelConfig(family="vae", options={"prior": "mixture", "mixture_components": bad})


def test_learning_rates_hold_then_fall_linearly_towards_zero_at_the_end():
    from aigc_ray.train.engine import lr_scale

    epochs = 60
    scales = [lr_scale(epoch / epochs, 0.5) for epoch in range(epochs)]
    assert scales[:30] == [1.0] * 30  # the first half at the configured rates
    assert scales[30:] == sorted(scales[30:], reverse=True) and 0 < scales[-1] <= 1 / 30 + 1e-9
    assert scales[45] == pytest.approx(0.5)
    assert {lr_scale(epoch / epochs, 1.0) for epoch in range(epochs)} == {1.0}  # the default: constant


def test_the_engine_trains_at_the_scaled_rates_and_a_resume_keeps_the_config_as_the_base(tmp_path):
    """What the training loop does at each epoch's start: the optimizers' rates become the config's
    times the epoch's scale; a resumed engine starts from the config's rates, not the saved ones."""
    from conftest import tiny_config

    from aigc_ray.train.engine import Engine

    cfg = tiny_config(tmp_path, "sngan", **{"train.lr_g": 4e-4, "train.lr_d": 1e-3, "train.lr_decay_start": 0.5})
    engine = Engine(cfg, torch.device("cpu"))
    engine.set_lr_scale(0.25)
    images, labels = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8), torch.zeros(8, dtype=torch.long)
    before = [p.detach().clone() for p in engine.G.parameters()]
    engine.train_batch(images, labels)
    assert [g["lr"] for g in engine.opt_g.param_groups] == [pytest.approx(1e-4)]
    assert [g["lr"] for g in engine.opt_d.param_groups] == [pytest.approx(2.5e-4)]
    assert any(not torch.equal(a, b) for a, b in zip(before, engine.G.parameters()))  # it still trains
    again = Engine(cfg, torch.device("cpu"))
    again.load_state_dict(engine.state_dict())
    assert again.opt_g.param_groups[0]["lr"] == pytest.approx(4e-4)


def test_the_engine_steps_by_the_progress_the_loop_sets(tmp_path):
    """A schedule a family keys on progress (the VAE's adversarial_start) follows Engine.set_progress,
    which the training loop calls at each epoch's start with the fraction of epochs done."""
    from conftest import tiny_config

    from aigc_ray.train.engine import Engine

    cfg = tiny_config(tmp_path, "vae", **{"model.options.adversarial_weight": 0.5,
                                          "model.options.adversarial_start": 0.5, "train.lr_d": 1e-3})
    engine = Engine(cfg, torch.device("cpu"))
    images, labels = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8), torch.zeros(8, dtype=torch.long)
    moved = []
    for progress in (0.0, 0.5):
        engine.set_progress(progress)
        before = [p.detach().clone() for p in engine.D.parameters()]
        out = engine.train_batch(images, labels)
        moved.append((any(not torch.equal(a, b) for a, b in zip(before, engine.D.parameters())),
                      float(out["adversarial_lambda"]) > 0))
    assert moved == [(False, False), (True, True)]


def test_conditional_vae_mixture_fits_each_class_apart_and_samples_the_asked_class():
    from aigc_ray.models.vae import VAE

    # two classes, each with two clusters of encodings; the class's components must find its own
    centres = torch.tensor([[[-6.0, 0.0], [6.0, 0.0]], [[0.0, -6.0], [0.0, 6.0]]])  # (class, cluster, d)
    model = VAE(8, 1, 2, 8, mixture_components=2, num_classes=2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        labels = torch.randint(0, 2, (64,), generator=gen)
        which = torch.randint(0, 2, (64,), generator=gen)
        mu = centres[labels, which] + 0.3 * torch.randn(64, 2, generator=gen)
        model._track_mixture(mu, torch.full((64, 2), -6.0), labels)
    means = (model.mix_sum / model.mix_count[:, None]).view(2, 2, 2)  # (class, component, d)
    for c in range(2):
        found = torch.cdist(centres[c], means[c]).min(1).values
        assert bool((found < 0.2).all()), f"class {c}'s components missed its clusters: {means[c]}"
    # a sample of class c lands on one of class c's clusters, never the other class's
    z = torch.randn(2000, 2, generator=gen)
    asked = torch.arange(2000) % 2
    latents = model._mixture_latents(z, asked)
    nearest = torch.cdist(latents, centres.view(4, 2)).argmin(1) // 2  # the class of the nearest cluster
    assert torch.equal(nearest, asked)
    with pytest.raises(ValueError, match="needs labels"):
        model.decode(torch.zeros(1, 2))


def test_conditional_vae_reconstructs_with_the_class_that_reproduces_the_image():
    from aigc_ray.models.vae import VAE

    torch.manual_seed(0)
    model = VAE(8, 1, 4, 8, mixture_components=2, num_classes=3).eval()
    images = torch.rand(6, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        mu = model.encode(images)[0]
        by_class = torch.stack([model.decode(mu, torch.full((6,), c)) for c in range(3)], 1)  # (6, 3, 1, 8, 8)
        best = (by_class - images[:, None]).pow(2).flatten(2).mean(2).argmin(1)
        assert torch.equal(model.decode_every_class(mu), by_class)
        assert len(set(best.tolist())) > 1  # the rows do not all pick one class, so the choice is per image
        assert torch.equal(model.reconstruct(images), by_class[torch.arange(6), best])


def test_vae_chroma_gain_changes_how_colour_is_read_and_written_not_what_is_saved():
    from aigc_ray.models.vae import VAE

    torch.manual_seed(0)
    plain = VAE(8, 3, 4, 8)
    torch.manual_seed(0)
    gained = VAE(8, 3, 4, 8, chroma_gain=3.0)
    assert plain.state_dict().keys() == gained.state_dict().keys()  # the colour maps are not weights
    gained.load_state_dict(plain.state_dict())
    plain.eval(), gained.eval()
    # the encoder reads opponent colour with the chroma scaled, the decoder writes it back to RGB
    opponent = torch.tensor([[1.0, 1.0, 1.0], [1.0, -1.0, 0.0], [1.0, 1.0, -2.0]])
    opponent = opponent / opponent.norm(dim=1, keepdim=True)
    gain = torch.tensor([1.0, 3.0, 3.0])
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    read = torch.einsum("oc,nchw->nohw", gain[:, None] * opponent, images)
    assert torch.allclose(gained.encode(images)[0], plain.encode(read)[0], atol=1e-5)
    z = torch.randn(2, 4)
    written = torch.einsum("co,nohw->nchw", opponent.T * gain, plain.decode_logits(z))
    assert torch.allclose(gained.decode_logits(z), written, atol=1e-5)
    # a grey model has no chroma to scale: the option leaves it as it was
    assert VAE(8, 1, 4, 8, chroma_gain=3.0).chroma_gain == 1.0
    for bad in (0, -1, 1000, "x"):
        with pytest.raises(ConfigError, match="model.options.chroma_gain"):
            ModelConfig(family="vae", options={"chroma_gain": bad})


def test_vae_adversarial_term_trains_a_discriminator_on_reconstructions_and_sizes_itself(tmp_path):
    from aigc_ray.config import ExperimentConfig
    from aigc_ray.models.sngan import SNDiscriminator

    cfg = ExperimentConfig.from_dict({"data": {"image_size": 8}, "model": {
        "family": "vae", "image_size": 8, "latent_dim": 4, "width": 8, "num_classes": 2,
        "options": {"prior": "mixture", "mixture_components": 2, "adversarial_weight": 0.5}}})
    family = get_family("vae")
    assert family.build(ModelConfig(family="vae", image_size=8, latent_dim=4, width=8))[1] is None  # off by default
    torch.manual_seed(0)
    G, D = family.build(cfg.model)
    assert isinstance(D, SNDiscriminator) and D.label_projection is not None  # conditional, as the VAE is
    opt_g, opt_d = torch.optim.Adam(G.parameters(), 1e-3), torch.optim.Adam(D.parameters(), 1e-3)
    nets = TrainNets(G, D, opt_g, opt_d, cfg.model, cfg.train)
    real, labels = torch.rand(6, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 0, 1, 0, 1])
    before_g, before_d = [p.detach().clone() for p in G.parameters()], [p.detach().clone() for p in D.parameters()]
    out = family.train_step(nets, real, labels, StepContext(), True)
    assert set(out) == family.train_metrics | family.adversarial_metrics
    assert all(torch.isfinite(v) for v in out.values()) and out["adversarial_lambda"] > 0
    assert all(not torch.equal(a, b) for a, b in zip(before_d, D.parameters()) if a.numel() > 1)  # D learned
    assert any(not torch.equal(a, b) for a, b in zip(before_g, G.parameters()))
    # lambda scales the term by the ratio of the two losses' gradients at the decoder's last layer:
    # doubling the weight doubles lambda for the same state
    from aigc_ray.models.steps import vae_adversarial_step

    state_g, state_d = copy.deepcopy(G.state_dict()), copy.deepcopy(D.state_dict())
    lambdas = []
    for weight in (0.5, 1.0):
        G.load_state_dict(state_g), D.load_state_dict(state_d)
        torch.manual_seed(1)
        lambdas.append(vae_adversarial_step(G, D, torch.optim.SGD(G.parameters(), 0.0), torch.optim.SGD(D.parameters(), 0.0),
                                            real, StepContext(), 0.25, "sigma", weight, G.decoder.net[-1].weight,
                                            labels)["adversarial_lambda"])
    assert torch.allclose(lambdas[1], 2 * lambdas[0])
    # train.lr_d means something for the VAE only with the term on; bad weights are refused
    path = tmp_path / "c.yaml"
    path.write_text("model: {family: vae, options: {adversarial_weight: 0.5}}\ntrain: {lr_d: 0.001}\n")
    assert load_config(str(path)).train.lr_d == 0.001
    path.write_text("model: {family: vae}\ntrain: {lr_d: 0.001}\n")
    with pytest.raises(ConfigError, match="train.lr_d means nothing for model family 'vae'"):
        load_config(str(path))
    for bad in (-0.1, 11, "x"):
        with pytest.raises(ConfigError, match="model.options.adversarial_weight"):
            ModelConfig(family="vae", options={"adversarial_weight": bad})


def test_vae_adversarial_term_on_samples_shows_the_discriminator_prior_draws_of_the_batch_classes():
    from aigc_ray.config import ExperimentConfig
    from aigc_ray.models.steps import vae_adversarial_step

    def build(fakes):
        cfg = ExperimentConfig.from_dict({"data": {"image_size": 8}, "model": {
            "family": "vae", "image_size": 8, "latent_dim": 4, "width": 8, "num_classes": 2,
            "options": {"prior": "mixture", "mixture_components": 2, "adversarial_weight": 0.5,
                        "adversarial_fakes": fakes}}})
        torch.manual_seed(0)
        return cfg, *get_family("vae").build(cfg.model)

    real, labels = torch.rand(6, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 1, 1, 0, 1])
    shown = {}
    for fakes in ("reconstructions", "samples"):
        cfg, G, D = build(fakes)
        seen = []
        D.register_forward_pre_hook(lambda _, args: seen.append((args[0].detach().clone(), args[1].clone())))
        torch.manual_seed(3)
        out = vae_adversarial_step(G, D, torch.optim.SGD(G.parameters(), 0.0), torch.optim.SGD(D.parameters(), 0.0),
                                   real, StepContext(), 0.25, "sigma", 0.5, G.decoder.net[-1].weight, labels,
                                   (), fakes)
        assert all(torch.isfinite(v) for v in out.values()) and out["adversarial_lambda"] > 0
        real_seen, fake_seen = seen[0], seen[1]  # D(real), then D(fake.detach())
        assert torch.equal(real_seen[0], real) and torch.equal(fake_seen[1], labels)
        shown[fakes] = fake_seen[0]
        # what the forward drew: the reparameterisation's noise, then the prior's standard normal
        torch.manual_seed(3)
        torch.randn(6, 4)
        z = torch.randn(6, 4)
        with torch.no_grad():
            draws = G.decode(G.prior_latents(z, labels), labels)  # train mode: the same BatchNorm statistics
            recons = torch.sigmoid(G(real, labels)[0]) * 2 - 1
        if fakes == "samples":
            assert torch.allclose(shown[fakes], draws, atol=1e-5)
        else:
            assert not torch.allclose(shown[fakes], draws, atol=1e-2)
    assert not torch.allclose(shown["samples"], shown["reconstructions"], atol=1e-2)
    # the trainer's step uses the option; a bad value is refused
    cfg, G, D = build("samples")
    nets = TrainNets(G, D, torch.optim.Adam(G.parameters(), 1e-3), torch.optim.Adam(D.parameters(), 1e-3),
                     cfg.model, cfg.train)
    before = [p.detach().clone() for p in D.parameters()]
    out = get_family("vae").train_step(nets, real, labels, StepContext(), True)
    assert all(torch.isfinite(v) for v in out.values())
    assert all(not torch.equal(a, b) for a, b in zip(before, D.parameters()) if a.numel() > 1)
    for bad in ("prior", "", 1):
        with pytest.raises(ConfigError, match="model.options.adversarial_fakes"):
            ModelConfig(family="vae", options={"adversarial_fakes": bad})


def test_vae_adversarial_start_keeps_the_discriminator_out_until_that_fraction_of_training():
    from aigc_ray.config import ExperimentConfig

    cfg = ExperimentConfig.from_dict({"data": {"image_size": 8}, "model": {
        "family": "vae", "image_size": 8, "latent_dim": 4, "width": 8,
        "options": {"adversarial_weight": 0.5, "adversarial_fakes": "samples", "adversarial_start": 0.5}}})
    family = get_family("vae")
    torch.manual_seed(0)
    G, D = family.build(cfg.model)
    real = torch.rand(4, 1, 8, 8) * 2 - 1
    phases = []
    for progress in (0.0, 0.25, 0.5, 0.75):
        assert family.step_phase(cfg.model, progress) == (progress >= 0.5)
        nets = TrainNets(G, D, torch.optim.Adam(G.parameters(), 1e-3), torch.optim.Adam(D.parameters(), 1e-3),
                         cfg.model, cfg.train, progress)
        before = [p.detach().clone() for p in D.parameters()]
        out = family.train_step(nets, real, None, StepContext(), True)
        assert set(out) == family.train_metrics | family.adversarial_metrics  # the same keys in every phase
        d_moved = any(not torch.equal(a, b) for a, b in zip(before, D.parameters()))
        phases.append((d_moved, float(out["adversarial_lambda"]) > 0))
    assert phases == [(False, False), (False, False), (True, True), (True, True)]
    for bad in (-0.1, 1, 1.5, "x"):
        with pytest.raises(ConfigError, match="model.options.adversarial_start"):
            ModelConfig(family="vae", options={"adversarial_start": bad})
