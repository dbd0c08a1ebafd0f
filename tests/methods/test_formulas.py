"""The methods' formulas against independent float64 references (numpy), as docs/methods.md states them."""

import math

import numpy as np
import pytest
import torch

from components.methods.atme import ATMEMemory, merge_memories
from components.methods.ddgan import vp_schedule
from components.methods.diffusion_gan import DiffusionAugment
from components.methods.losses import GANLoss, r1_penalty
from components.training.loop import TrainingSession
from components.training_stats import StatsCollector, binary_entropy_of_logits, report_discriminator_health
from support.params import shipped
from support.synthetic_pairs import single_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("single_thread")


def diffusion_gan_params(**keys):
    return shipped("model", method={"diffusion_gan": keys}).method.diffusion_gan


def loss_params(**keys):
    return shipped("model", method={"loss": keys}).method.loss


@pytest.mark.parametrize("num_steps", [2, 4])
def test_ddgan_betas_and_posterior_match_the_paper(num_steps):
    beta_min, beta_max = 0.1, 20.0
    t = np.array([k / num_steps * (1 - 1e-3) + 1e-3 for k in range(num_steps + 1)], dtype=np.float64)
    abar = np.exp(-0.5 * t**2 * (beta_max - beta_min) - t * beta_min)
    betas = 1 - abar[1:] / abar[:-1]
    schedule = vp_schedule(num_steps, beta_min, beta_max)
    np.testing.assert_allclose(schedule["betas"].numpy(), betas, rtol=1e-12)
    # q(y_k | y_0): the product of the one-step factors (k = 0 is the clean image).
    for k in range(1, num_steps + 1):
        np.testing.assert_allclose(schedule["a_cum"][k].item() ** 2, np.prod(1 - betas[:k]) * (1 - 1e-8), rtol=1e-10)
    # DDPM posterior q(y_{k} | y_{k+1}, y_0) with alphabar_k = prod_{i<=k}(1 - beta_i).
    cumulative = np.cumprod(1 - betas)
    previous = np.concatenate([[1.0], cumulative[:-1]])
    np.testing.assert_allclose(schedule["coef1"].numpy(), betas * np.sqrt(previous) / (1 - cumulative), rtol=1e-12)
    np.testing.assert_allclose(schedule["coef2"].numpy(), (1 - previous) * np.sqrt(1 - betas) / (1 - cumulative), rtol=1e-12)
    variance = betas * (1 - previous) / (1 - cumulative)
    np.testing.assert_allclose(schedule["log_var"].numpy(), np.log(np.maximum(variance, 1e-20)), rtol=1e-12)
    # The last denoising step returns the predicted clean image itself.
    assert schedule["coef1"][0].item() == pytest.approx(1.0) and schedule["coef2"][0].item() == 0.0


def test_diffusion_gan_alpha_bar_and_diffusion_match_reference():
    params = diffusion_gan_params(t_min=5, t_max=100)
    augment = DiffusionAugment(params, torch.device("cpu"))
    augment.T = torch.tensor(37)
    betas = np.linspace(params.beta_start, params.beta_end, 37, dtype=np.float64)
    abar = np.concatenate([[1.0], np.cumprod(1 - betas)])
    t = torch.tensor([0, 1, 2, 20, 37])
    np.testing.assert_allclose(augment.alpha_bar(t).numpy(), abar[t.numpy()], rtol=1e-10)

    y = torch.rand(5, 3, 8, 8) * 2 - 1
    torch.manual_seed(3)
    diffused = augment.diffuse(y, t)
    torch.manual_seed(3)
    noise = torch.randn_like(y).double()
    expected = np.sqrt(abar[t.numpy()])[:, None, None, None] * y.double().numpy() + (
        np.sqrt(1 - abar[t.numpy()])[:, None, None, None] * params.sigma * noise.numpy()
    )
    np.testing.assert_allclose(diffused.numpy(), expected, atol=1e-6)
    assert torch.equal(diffused[0], y[0])  # t = 0 is the clean image


def test_adaptive_t_follows_the_scripted_r_d_sequence():
    params = diffusion_gan_params(t_min=5, t_max=500, d_target=0.6, ada_kimg=0.5, update_interval=4)
    augment = DiffusionAugment(params, torch.device("cpu"))
    batch = 8
    scripted = [0.9, 0.9, 0.7, 0.1, 0.6, 1.0, -0.5, 0.95] * 5
    p, expected = 0.0, []
    for r_d in scripted:
        p = float(np.clip(p + np.sign(r_d - 0.6) * batch * 4 / (0.5 * 1000), 0, 1))
        expected.append(int(5 + np.round(p * (500 - 5))))
    observed = []
    for r_d in scripted:
        augment.update(torch.tensor(r_d, dtype=torch.float64), batch * 4)
        observed.append(int(augment.T))
    assert observed == expected
    assert max(observed) > 5  # the script does move T


def test_adaptive_t_updates_every_interval_from_mean_sign_of_real_logits():
    params = diffusion_gan_params(t_min=5, t_max=500, d_target=0.6, ada_kimg=0.1, update_interval=4)
    augment = DiffusionAugment(params, torch.device("cpu"))
    confident = torch.full((4, 1, 2, 2), 3.0)  # sign +1 everywhere: r_d = 1 > 0.6, T must grow
    for _ in range(3):
        augment.observe_real_logits(confident)
        augment.after_batch(4)
    assert int(augment.T) == 5  # no update before the 4th batch
    augment.observe_real_logits(confident)
    augment.after_batch(4)
    assert augment.r_d.item() == 1.0
    assert int(augment.T) == 5 + round(4 * 4 / 100 * 495)


@pytest.mark.parametrize("distribution", ["priority", "uniform"])
def test_t_sampling_half_clean_rest_within_current_t(distribution):
    params = diffusion_gan_params(t_min=5, t_max=50, t_distribution=distribution)
    augment = DiffusionAugment(params, torch.device("cpu"))
    augment.T = torch.tensor(20)
    torch.manual_seed(0)
    t = augment.sample_t(40000)
    assert 0.48 < (t == 0).float().mean().item() < 0.52
    diffused = t[t > 0].double()
    assert diffused.min() >= 1 and diffused.max() <= 20
    steps = np.arange(1, 21)
    weights = steps if distribution == "priority" else np.ones(20)
    expected_mean = (steps * weights).sum() / weights.sum()
    assert diffused.mean().item() == pytest.approx(expected_mean, rel=0.02)


def test_mean_entropy_and_gan_value_at_known_points():
    logits = torch.tensor([0.0, 2.0, -3.0, 40.0], dtype=torch.float64)
    p = 1 / (1 + np.exp(-logits.numpy()))
    with np.errstate(divide="ignore", invalid="ignore"):
        reference = np.nan_to_num(-p * np.log(p) - (1 - p) * np.log(1 - p))
    np.testing.assert_allclose(binary_entropy_of_logits(logits).numpy(), reference, atol=1e-12)
    assert binary_entropy_of_logits(torch.zeros(1)).item() == pytest.approx(math.log(2))

    # D = 1/2 everywhere: D_real + D_fake = log 4, V gap 0, entropy log 2, accuracy 1/2 by convention.
    stats = StatsCollector()
    report_discriminator_health(stats, torch.zeros(2, 1, 3, 3), torch.zeros(2, 1, 3, 3))
    values = {name: value.item() for name, value in stats.step_values.items()}
    assert values["health/D_real"] + values["health/D_fake"] == pytest.approx(math.log(4))
    assert values["health/V_gap"] == pytest.approx(0.0, abs=1e-6)
    assert values["health/D_entropy"] == pytest.approx(math.log(2))
    # A D that is right everywhere with confidence: accuracy 1, entropy near 0.
    stats.begin_step()
    report_discriminator_health(stats, torch.full((2, 1, 3, 3), 20.0), torch.full((2, 1, 3, 3), -20.0))
    assert stats.step_values["health/D_accuracy"].item() == 1.0
    assert stats.step_values["health/D_entropy"].item() < 1e-6


def _distinct_map(index: int, size: int) -> torch.Tensor:
    # Asymmetric left-right, so a lost or doubled flip shows.
    return torch.arange(size * size, dtype=torch.float32).reshape(1, size, size) + 1000 * index


def test_atme_memory_read_returns_the_map_written_for_that_sample_under_shuffling_and_flip():
    memory = ATMEMemory(dataset_size=10, map_size=3, patch_stride=8, crop_margin=0, device=torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    written = {}
    for _ in range(3):  # three shuffled "epochs" with fresh random flips
        order = torch.randperm(10, generator=generator)
        for batch in order.split(4):
            flip = torch.rand(len(batch), generator=generator) < 0.5
            crop = torch.zeros(len(batch), 2, dtype=torch.long)
            # Before writing: what we read is what was written for these samples (in this batch's frame).
            read = memory.read(batch, flip, crop)
            for row, index in enumerate(batch.tolist()):
                if index in written:
                    expected = written[index].flip(-1) if flip[row] else written[index]
                    assert torch.equal(read[row], expected)
            maps = torch.stack([_distinct_map(i, 3) + torch.rand(()).item() for i in batch.tolist()])
            memory.write(batch, flip, crop, maps)
            for row, index in enumerate(batch.tolist()):
                # stored in the un-flipped frame
                written[index] = maps[row].flip(-1) if flip[row] else maps[row]
    assert memory.owned.all()


def test_atme_memory_places_crops_in_the_uncropped_frame():
    # load 48, crop 32, patch stride 8: the canvas is 2 cells wider than the 2x2 map.
    memory = ATMEMemory(dataset_size=1, map_size=2, patch_stride=8, crop_margin=16, device=torch.device("cpu"))
    index, no_flip = torch.tensor([0]), torch.tensor([False])
    map_at_origin = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    memory.write(index, no_flip, torch.tensor([[0, 0]]), map_at_origin)
    # A crop shifted right by one patch sees column 2.. of the stored canvas: its left column is
    # the old right column.
    shifted = memory.read(index, no_flip, torch.tensor([[0, 8]]))
    assert torch.equal(shifted[0, 0, :, 0], map_at_origin[0, 0, :, 1])
    # Same crop, flipped: the same image region mirrored.
    flipped = memory.read(index, torch.tensor([True]), torch.tensor([[0, 0]]))
    assert torch.equal(flipped, map_at_origin.flip(-1))


def test_merge_memories_takes_each_entry_from_its_owner():
    maps_rank0 = torch.zeros(4, 2, 2)
    maps_rank1 = torch.full((4, 2, 2), 5.0)
    owned_rank0 = torch.tensor([True, True, False, False])
    owned_rank1 = torch.tensor([False, False, True, False])
    maps_rank0[:2] = 1.0
    maps_rank1[2] = 7.0
    pending = {}

    def all_reduce_for(rank_tensors):
        # Simulates torch.distributed.all_reduce(SUM) over two ranks, called in the same order on both.
        def reduce(tensor):
            key = len(pending)
            pending[key] = rank_tensors[key]
            return tensor + rank_tensors[key]

        return reduce

    others = [maps_rank1 * owned_rank1.float()[:, None, None], owned_rank1.float()]
    merged, owned = merge_memories(maps_rank0, owned_rank0, all_reduce_for(others))
    assert torch.equal(merged[:2], torch.ones(2, 2, 2))
    assert torch.equal(merged[2], torch.full((2, 2), 7.0))
    assert torch.equal(merged[3], maps_rank0[3])  # nobody wrote it: the local value stays
    assert owned.tolist() == [True, True, True, False]


def test_gan_loss_options_match_their_definitions():
    real = torch.tensor([[2.0, -1.0]], dtype=torch.float64)
    fake = torch.tensor([[-3.0, 0.5]], dtype=torch.float64)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    vanilla = GANLoss(loss_params(gan_loss="vanilla", label_smoothing=0.1))
    expected = 0.5 * (bce(real, torch.full_like(real, 0.9)) + bce(fake, torch.zeros_like(fake)))
    assert vanilla.discriminator(real, fake).item() == pytest.approx(expected.item())
    assert vanilla.generator(fake).item() == pytest.approx(bce(fake, torch.ones_like(fake)).item())
    lsgan = GANLoss(loss_params(gan_loss="lsgan"))
    assert lsgan.discriminator(real, fake).item() == pytest.approx(0.5 * (((real - 1) ** 2).mean() + (fake**2).mean()).item())
    assert lsgan.generator(fake).item() == pytest.approx(((fake - 1) ** 2).mean().item())
    hinge = GANLoss(loss_params(gan_loss="hinge"))
    expected = 0.5 * (torch.relu(1 - real).mean() + torch.relu(1 + fake).mean())
    assert hinge.discriminator(real, fake).item() == pytest.approx(expected.item())
    assert hinge.generator(fake).item() == pytest.approx(-fake.mean().item())


def test_r1_penalty_is_the_squared_input_gradient_norm():
    # One logit per sample (DDGAN's official D): the usual R1, exactly.
    x = torch.randn(3, 2, 4, 4, requires_grad=True)
    logits = (x**2).sum(dim=(1, 2, 3), keepdim=True)  # gradient 2x
    assert r1_penalty(logits, x).item() == pytest.approx((4 * x.detach() ** 2).sum(dim=(1, 2, 3)).mean().item(), rel=1e-5)


def test_r1_penalty_of_a_logit_map_is_the_mean_of_each_patch_logits_r1():
    # Patches that see disjoint pixels (a 1x1 convolution): each logit's input gradient is the
    # conv's weights on the target channels, so each patch's R1 is |w_target|^2, whatever the
    # number of patches. (The R1 of the map's sum would be 256 times that here, its mean's 1/256.)
    conv = torch.nn.Conv2d(6, 1, 1)
    source, target = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16, requires_grad=True)
    logits = conv(torch.cat([source, target], dim=1))
    per_patch = conv.weight[0, 3:].square().sum().item()
    assert r1_penalty(logits, target).item() == pytest.approx(per_patch, rel=1e-5)


def test_r1_penalty_at_initialisation_does_not_grow_with_the_image_size():
    # A published gamma must mean the same at 64 px as at 256 px: at initialisation a PatchGAN's
    # per-patch R1 is about the same at every size (measured 1.07, 1.15, 1.19 for the exact
    # mean over patches), where the R1 of the map's sum grows with the number of patches
    # (13.9, 45.7, 150: 36, 196 and 900 patches).
    from components.networks.pix2pix import PatchGAN

    penalties = {}
    for size in (64, 128, 256):
        torch.manual_seed(0)
        discriminator = PatchGAN(6, ndf=16, n_layers=3, norm="instance")
        source = torch.rand(2, 3, size, size) * 2 - 1
        target = (torch.rand(2, 3, size, size) * 2 - 1).requires_grad_(True)
        logits = discriminator(torch.cat([source, target], dim=1))
        penalties[size] = sum(r1_penalty(logits, target).item() for _ in range(4)) / 4
    assert max(penalties.values()) / min(penalties.values()) < 1.3, penalties


def test_ddgan_posterior_sample_given_the_true_y0_has_the_forward_marginal():
    # If G predicted y0 exactly, its fake y_t would be distributed as the real y_t: D could not
    # tell them apart. Check mean and std of y_t (for every t) against q(y_t | y_0).
    method = TrainingSession(
        shipped(
            "model",
            image_size=16,
            method={
                "name": "ddgan",
                "num_steps": 4,
                "generator": {"width": 8, "channel_multipliers": [1, 2], "attention_levels": []},
                "discriminator": {"ndf": 8, "n_layers": 1},
            },
        ),
        shipped("train"),
        1,
        torch.device("cpu"),
    ).method
    torch.manual_seed(0)
    y0 = torch.full((20000, 1, 1, 1), 0.7)
    for k in range(4):
        t = torch.full((20000,), k)
        real, y_next = method.diffuse_pair(y0, t)
        fake = method.posterior_sample(y0, y_next, t)
        schedule = method.schedule
        assert real.mean().item() == pytest.approx(0.7 * schedule["a_cum"][k].item(), abs=0.02)
        assert fake.mean().item() == pytest.approx(real.mean().item(), abs=0.02)
        assert fake.std().item() == pytest.approx(max(real.std().item(), 1e-4), rel=0.05, abs=2e-3)


def test_adaptive_t_partial_sums_are_gathered_for_a_checkpoint_and_resume_on_rank_0_only():
    schedule = {"t_min": 5, "t_max": 500, "d_target": 0.6, "ada_kimg": 0.1, "update_interval": 4}
    params = shipped("model", method={"diffusion_gan": schedule}).method.diffusion_gan

    def with_other_worker(value: torch.Tensor) -> torch.Tensor:
        # The other worker: sign sum -6 over 8 logits, 2 images; a second tensor for the counts.
        return value + (value.new_tensor(-6.0) if value.dim() == 0 else value.new_tensor([8.0, 2.0]))

    augment = DiffusionAugment(params, torch.device("cpu"))
    augment.observe_real_logits(torch.full((2, 1, 2, 2), 3.0))
    augment.after_batch(2)  # the first of 4 batches: no update yet
    gathered = augment.state_dict(gather=with_other_worker)
    assert (gathered["sign_sum"].item(), gathered["sign_count"], gathered["images"]) == (2.0, 16, 4)
    # Resumed on two workers: the group's partial sums continue on rank 0 alone, so the next
    # update's sum over workers counts them once.
    for rank, expected in ((0, (2.0, 16, 4)), (1, (0.0, 0, 0))):
        resumed = DiffusionAugment(params, torch.device("cpu"), rank=rank)
        resumed.load_state_dict(gathered)
        assert (resumed._sign_sum.item(), resumed._sign_count, resumed._images) == expected
        assert resumed._batches == 1


def test_adaptive_t_uses_r_d_and_image_count_summed_over_workers():
    params = diffusion_gan_params(t_min=5, t_max=500, d_target=0.6, ada_kimg=0.1, update_interval=1)

    def with_other_worker(totals: torch.Tensor) -> torch.Tensor:
        # The other worker saw 16 logits, all negative, over 4 images: global r_d = (16 - 16) / 32 = 0.
        return totals + totals.new_tensor([-16.0, 16.0, 4.0])

    augment = DiffusionAugment(params, torch.device("cpu"), reduce=with_other_worker)
    augment.p = torch.tensor(0.5, dtype=torch.float64)
    augment.observe_real_logits(torch.full((4, 1, 2, 2), 3.0))
    augment.after_batch(4)
    assert augment.r_d.item() == 0.0  # below d_target: p falls by 8 images / 100
    assert augment.p.item() == pytest.approx(0.5 - 8 / 100)


def test_ddgan_d_loss_is_the_official_unhalved_softplus_sum_and_pix2pix_keeps_its_half():
    # DDGAN's lazy R1 (gamma / 2 |grad|^2) is weighed against this loss: halving it (pix2pix's
    # convention) would silently double the effective r1_gamma against the published values.
    real = torch.tensor([[2.0, -1.0, 0.3]], dtype=torch.float64)
    fake = torch.tensor([[-3.0, 0.5, 1.2]], dtype=torch.float64)
    softplus = torch.nn.functional.softplus
    official = (softplus(-real).mean() + softplus(fake).mean()).item()

    def method(name: str, extra: dict):
        model = shipped("model", image_size=16, method={"name": name, "discriminator": {"ndf": 8, "n_layers": 1}, **extra})
        return TrainingSession(model, shipped("train"), 1, torch.device("cpu")).method

    small_unet = {"width": 8, "channel_multipliers": [1, 2], "attention_levels": []}
    ddgan = method("ddgan", {"generator": small_unet, "num_steps": 2})
    pix2pix = method("pix2pix", {"generator": {"ngf": 8}})
    assert ddgan.gan_loss.discriminator(real, fake).item() == pytest.approx(official, rel=1e-6)
    assert pix2pix.gan_loss.discriminator(real, fake).item() == pytest.approx(0.5 * official, rel=1e-6)
