"""The DeciLM / Nemotron-NAS config class that a random-weight model folder ships as remote code.

Not imported by amoeba-profile itself: the tensorrt-llm backend copies this file into every
per-layer artifact, and ``--export`` into every DeciLM-form export, as ``configuration_decilm.py``,
the module that ``config.json``'s ``auto_map`` names (``amoeba_profile.core.export.deci_config``).
transformers has no built-in ``nemotron-nas`` config, so TensorRT-LLM's PyTorch flow loads one with
``AutoConfig.from_pretrained(..., trust_remote_code=True)`` (``_torch/pyexecutor/config_utils.py``
``load_pretrained_config``, called with ``trust_remote_code=True`` by
``_torch/pyexecutor/model_loader.py``), which imports this class from the model folder. NVIDIA's
checkpoints ship their own ``configuration_decilm.py``; a folder built from random weights has
none, and fetching one would be a download.

TensorRT-LLM's model (``_torch/models/modeling_nemotron_nas.py``) reads each block as attributes:
``block.attention.no_op``, ``.replace_with_linear``, ``.n_heads_in_group`` (read even for a no-op
attention, where it is None and the layer gets 0 kv heads) and ``block.ffn.no_op``,
``.replace_with_linear``, ``.ffn_mult``. This class turns each block's two dicts into objects with
those attributes, every one present: a field a block leaves out takes the default of the
Nemotron-NAS checkpoints' ``block_config.py`` (False, or None for the widths), so a no-op block
written as ``{"no_op": true}`` still reads. It refuses what that file refuses (no_op together
with replace_with_linear, an active attention without ``n_heads_in_group``, an active FFN without
``ffn_mult``, a block count other than ``num_hidden_layers``) and writes blocks back as plain dicts
when the config is saved. The file stands alone (transformers copies it without its package), so
it imports only transformers.
"""

from types import SimpleNamespace

from transformers import PretrainedConfig

# The fields TensorRT-LLM reads per section, with block_config.py's defaults.
ATTENTION_DEFAULTS = {"no_op": False, "replace_with_linear": False, "n_heads_in_group": None}
FFN_DEFAULTS = {"no_op": False, "replace_with_linear": False, "ffn_mult": None}


def _section(name: str, given: dict, defaults: dict, width: str) -> SimpleNamespace:
    values = {**defaults, **given}
    if values["no_op"] and values["replace_with_linear"]:
        raise ValueError(f"block_configs {name}: no_op and replace_with_linear are exclusive")
    if not (values["no_op"] or values["replace_with_linear"]) and values[width] is None:
        raise ValueError(f"block_configs {name}: an active {name} needs {width}")
    if name == "ffn" and values["ffn_mult"] is not None:
        values["ffn_mult"] = round(values["ffn_mult"], 6)  # as block_config.py's FFNConfig does
    return SimpleNamespace(**values)


class BlockConfig:
    """One decoder layer: ``attention`` and ``ffn`` sections with attribute access."""

    def __init__(self, attention: dict, ffn: dict):
        self.attention = _section("attention", attention, ATTENTION_DEFAULTS, "n_heads_in_group")
        self.ffn = _section("ffn", ffn, FFN_DEFAULTS, "ffn_mult")

    def to_dict(self) -> dict:
        return {"attention": dict(vars(self.attention)), "ffn": dict(vars(self.ffn))}


class DeciLMConfig(PretrainedConfig):
    """``model_type: nemotron-nas``: LLaMA fields plus one ``BlockConfig`` per layer."""

    model_type = "nemotron-nas"

    def __init__(self, block_configs=None, **kwargs):
        self.block_configs = [
            block if isinstance(block, BlockConfig) else BlockConfig(**block) for block in block_configs or []
        ]
        super().__init__(**kwargs)
        layers = getattr(self, "num_hidden_layers", None)
        if self.block_configs and layers is not None and len(self.block_configs) != layers:
            raise ValueError(f"{len(self.block_configs)} block_configs for num_hidden_layers={layers}")

    def to_dict(self) -> dict:
        output = super().to_dict()
        output["block_configs"] = [block.to_dict() for block in self.block_configs]
        return output
