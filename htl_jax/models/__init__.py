"""Model registry: ``MODELS[name](spec=spec, cfg=model_config) -> HybridModel``.

Every model subclasses :class:`htl_jax.models.interface.HybridModel` and declares its class
facts there (shared parameters, isolated towers, default gradient process). Pick one with
``--config.model=NAME``.
"""

from __future__ import annotations

from htl_jax.spec import HybridSpec
from htl_jax.models.adatt import AdaTT
from htl_jax.models.aitm import AITM
from htl_jax.models.dnn import DNN
from htl_jax.models.esmm import ESMM
from htl_jax.models.htlnet import HTLNet
from htl_jax.models.interface import HybridModel, ModelConfig, ModelOutput
from htl_jax.models.mmoe import MMoE
from htl_jax.models.ple import PLE
from htl_jax.models.shared_bottom import SharedBottom
from htl_jax.models.tafe import TAFE
from htl_jax.models.ziln import ZILN

MODELS: dict[str, type[HybridModel]] = {
    'htlnet': HTLNet,
    'dnn': DNN,
    'shared_bottom': SharedBottom,
    'mmoe': MMoE,
    'ple': PLE,
    'adatt': AdaTT,
    'esmm': ESMM,
    'aitm': AITM,
    'tafe': TAFE,
    'ziln': ZILN,
}


def model_class(name: str) -> type[HybridModel]:
  """The class registered as ``name``; unknown names list the known ones."""
  if name not in MODELS:
    raise ValueError(f'unknown model {name!r}; known models: {", ".join(sorted(MODELS))}')
  return MODELS[name]


def get_model(name: str, spec: HybridSpec, cfg: ModelConfig) -> HybridModel:
  """Build the model called ``name``."""
  return model_class(name)(spec=spec, cfg=cfg)


__all__ = ['MODELS', 'HybridModel', 'ModelConfig', 'ModelOutput', 'get_model', 'model_class']
