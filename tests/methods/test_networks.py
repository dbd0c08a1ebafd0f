"""Network shapes at several image sizes, and that every conditioning input is actually used."""

import pytest
import torch

from components.networks.atme_w import ATMEW
from components.networks.ddpm_unet import DDPMUNet
from components.networks.pix2pix import PatchGAN, UNetGenerator, patch_map_size
from support.synthetic_pairs import single_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("size", [32, 64, 256])
def test_unet_depth_follows_image_size(size):
    generator = UNetGenerator(3, 3, size, ngf=4, norm="instance")
    assert len(generator.downs) == size.bit_length() - 1  # down to 1 x 1
    out = generator(torch.rand(2, 3, size, size) * 2 - 1)
    assert out.shape == (2, 3, size, size)
    assert out.abs().max() <= 1


def test_unet_has_dropout_in_three_inner_decoder_blocks_at_256():
    generator = UNetGenerator(3, 3, 256, ngf=4, dropout=0.5)
    with_dropout = [i for i, block in enumerate(generator.ups) if any(isinstance(m, torch.nn.Dropout) for m in block)]
    assert with_dropout == [4, 5, 6]


@pytest.mark.parametrize("size,n_layers,expected", [(256, 3, 30), (64, 3, 6), (32, 2, 6)])
def test_patchgan_map_size(size, n_layers, expected):
    for norm in ("instance", "batch", "none"):
        discriminator = PatchGAN(6, ndf=4, n_layers=n_layers, norm=norm)
        assert discriminator(torch.randn(2, 6, size, size)).shape == (2, 1, expected, expected)
    assert patch_map_size(size, n_layers) == expected


def test_time_conditioned_patchgan_depends_on_t():
    discriminator = PatchGAN(6, ndf=8, n_layers=2, norm="instance", time_conditioned=True)
    x = torch.randn(2, 6, 32, 32)
    a = discriminator(x, torch.tensor([0.0, 0.0]))
    b = discriminator(x, torch.tensor([50.0, 50.0]))
    assert not torch.allclose(a, b)


def test_ddpm_unet_shapes_and_inputs_t_z():
    unet = DDPMUNet(6, 3, width=8, channel_multipliers=(1, 2, 2), attention_levels=(0, 2), blocks_per_level=2, groups=4, latent_dim=5)
    x = torch.randn(2, 6, 32, 32)
    z = torch.randn(2, 5)
    out = unet(x, torch.tensor([0.0, 1.0]), z)
    assert out.shape == (2, 3, 32, 32)
    assert not torch.allclose(out, unet(x, torch.tensor([0.0, 1.0]), torch.randn(2, 5)))
    assert not torch.allclose(out, unet(x, torch.tensor([1.0, 0.0]), z))


def test_ddpm_unet_gradients_reach_every_parameter():
    unet = DDPMUNet(3, 3, width=8, channel_multipliers=(1, 2), attention_levels=(0, 1), blocks_per_level=1, groups=4)
    unet(torch.randn(2, 3, 16, 16), torch.rand(2)).square().mean().backward()
    missing = [name for name, p in unet.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


@pytest.mark.parametrize("size,map_size", [(32, 2), (64, 6), (256, 30)])
def test_atme_w_maps_the_d_map_to_any_image_size(size, map_size):
    w = ATMEW(size, channels=(8, 8, 8))
    out = w(torch.rand(2, 1, map_size, map_size))
    assert out.shape == (2, 1, size, size)
    assert out.abs().max() < 1


def test_patchgan_sees_70x70_patches_and_has_no_norm_on_its_first_layer():
    discriminator = PatchGAN(6, ndf=4, n_layers=3, norm="instance")
    assert isinstance(discriminator.norms[0], torch.nn.Identity)
    assert all(isinstance(norm, torch.nn.InstanceNorm2d) for norm in discriminator.norms[1:])
    # Receptive field of one logit: the input pixels its gradient reaches (norm "none" so the
    # per-image statistics of a norm do not spread it over the whole image).
    discriminator = PatchGAN(6, ndf=4, n_layers=3, norm="none")
    image = torch.randn(1, 6, 256, 256, requires_grad=True)
    discriminator(image)[0, 0, 15, 15].backward()
    rows, cols = image.grad[0].abs().sum(0).nonzero().unbind(1)
    assert (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) == (70, 70)


def test_batch_norm_under_a_split_batch_is_synchronised_on_gpus_and_kept_with_a_warning_on_cpus(caplog):
    from pathlib import Path

    import yaml

    from components.config.model import ModelParams
    from components.methods.base import MethodContext
    from components.methods.pix2pix import Pix2Pix

    model = yaml.safe_load((Path(__file__).resolve().parents[2] / "params/model.yaml").read_text())
    model.update(image_size=32, load_size=32)
    model["method"].update(generator={**model["method"]["generator"], "ngf": 4, "norm": "batch"},
                           discriminator={**model["method"]["discriminator"], "ndf": 4, "n_layers": 2, "norm": "batch"})
    model = ModelParams.model_validate(model)

    def norms(method: Pix2Pix) -> set[type]:
        return {type(layer) for network in (method.G, method.D) for layer in network.modules()
                if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm)}

    # Built only, never run: no GPU needed to see which layers a GPU run would use.
    assert norms(Pix2Pix(MethodContext(model, 8, torch.device("cuda"), world_size=2))) == {torch.nn.SyncBatchNorm}
    assert norms(Pix2Pix(MethodContext(model, 8, torch.device("cuda"), world_size=1))) == {torch.nn.BatchNorm2d}
    with caplog.at_level("WARNING", logger="components.methods.base"):
        assert norms(Pix2Pix(MethodContext(model, 8, torch.device("cpu"), world_size=2))) == {torch.nn.BatchNorm2d}
    assert "norm: instance" in caplog.text and "2 CPU workers" in caplog.text
