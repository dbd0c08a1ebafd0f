"""The one list of training methods: each params branch of `method:` and the class that trains it.

The class also builds its untrained sampler (to load an exported generator into), so the loop,
the Ray worker and the Translator never name a method.
"""

from components.config.model import ATMEParams, DDGANParams, ModelParams, Pix2PixParams
from components.methods.atme import ATME
from components.methods.base import Method, MethodContext, Sampler
from components.methods.ddgan import DDGAN
from components.methods.pix2pix import Pix2Pix

METHODS: dict[type, type[Method]] = {Pix2PixParams: Pix2Pix, ATMEParams: ATME, DDGANParams: DDGAN}


def method_class(model: ModelParams) -> type[Method]:
    try:
        return METHODS[type(model.method)]
    except KeyError:
        raise TypeError(f"no training method is registered for {type(model.method).__name__}") from None


def build_method(context: MethodContext) -> Method:
    return method_class(context.model)(context)


def build_sampler(model: ModelParams) -> Sampler:
    """A sampler of the right architecture for `model`, to load an export's state into."""
    return method_class(model).untrained_sampler(model)
