"""The DeciLM / Nemotron-NAS config class that a random-weight model folder ships as remote code.

Not imported by amoeba-profile itself: the tensorrt-llm backend copies this file into every
per-layer artifact as ``configuration_decilm.py``, the module that ``config.json``'s ``auto_map``
names (``amoeba_profile.core.export.deci_config``). transformers has no built-in ``nemotron-nas``
config, so TensorRT-LLM's PyTorch flow loads one with ``AutoConfig.from_pretrained(...,
trust_remote_code=True)`` (``_torch/pyexecutor/config_utils.py`` ``load_pretrained_config``,
called with ``trust_remote_code=True`` by ``_torch/pyexecutor/model_loader.py``), which imports this
class from the model folder. NVIDIA's checkpoints ship their own ``configuration_decilm.py``; a
folder built from random weights has none, and fetching one would be a download.

TensorRT-LLM's model (``_torch/models/modeling_nemotron_nas.py``) reads each block as attributes:
``block.attention.no_op``, ``.replace_with_linear``, ``.n_heads_in_group`` and ``block.ffn.no_op``,
``.replace_with_linear``, ``.ffn_mult``. This class turns each block's two dicts into objects with
those attributes and back into dicts when the config is saved. The file stands alone (transformers
copies it without its package), so it imports only transformers.
"""

from types import SimpleNamespace

from transformers import PretrainedConfig


class BlockConfig:
    """One decoder layer: ``attention`` and ``ffn`` sections with attribute access."""

    def __init__(self, attention: dict, ffn: dict):
        self.attention = SimpleNamespace(**attention)
        self.ffn = SimpleNamespace(**ffn)

    def to_dict(self) -> dict:
        return {"attention": dict(vars(self.attention)), "ffn": dict(vars(self.ffn))}


class DeciLMConfig(PretrainedConfig):
    """``model_type: nemotron-nas``: LLaMA fields plus one ``BlockConfig`` per layer."""

    model_type = "nemotron-nas"

    def __init__(self, block_configs=None, **kwargs):
        self.block_configs = [block if isinstance(block, BlockConfig) else BlockConfig(**block)
                              for block in block_configs or []]
        super().__init__(**kwargs)

    def to_dict(self) -> dict:
        output = super().to_dict()
        output["block_configs"] = [block.to_dict() for block in self.block_configs]
        return output
