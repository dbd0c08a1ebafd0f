"""Method selection: an explicit mapping from the params branch to the method class."""

import torch

from components.config.model import ATMEParams, DDGANParams, ModelParams, Pix2PixParams
from components.methods.atme import ATME
from components.methods.base import Autocast, Method, Prepare, Reduce
from components.methods.ddgan import DDGAN
from components.methods.pix2pix import Pix2Pix

METHODS: dict[type, type] = {Pix2PixParams: Pix2Pix, ATMEParams: ATME, DDGANParams: DDGAN}


def build_method(
    model: ModelParams,
    dataset_size: int,
    device: torch.device,
    prepare: Prepare,
    autocast: Autocast,
    reduce: Reduce | None = None,
) -> Method:
    return METHODS[type(model.method)](model, dataset_size, device, prepare, autocast, reduce)
