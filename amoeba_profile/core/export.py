"""Write a chosen subnet in the forms deployment tools load, and say which tool reads which file.

| file | written when | read by |
|---|---|---|
| ``subnet.json`` | always | this project (``Subnet.from_json``) |
| ``config.json``, plain LLaMA (``model_type: llama``, ``head_dim`` explicit) | every kept layer has one shape and its query-head count divides ``hidden_size`` | transformers ``AutoConfig`` / ``AutoModelForCausalLM``; the LLaMA paths of TensorRT-LLM, vLLM and MLC-LLM's ``convert_weight`` |
| ``config.json``, DeciLM / Nemotron-NAS (``model_type: nemotron-nas``, ``block_configs``) | otherwise | TensorRT-LLM (PyTorch flow ``_torch/models/modeling_nemotron_nas.py``; checkpoint converter ``models/nemotron_nas``); transformers ``AutoConfig`` with ``trust_remote_code`` |
| ``configuration_decilm.py`` | with the DeciLM form | transformers ``AutoConfig.from_pretrained(folder, trust_remote_code=True)`` (``auto_map``); the model class ``modeling_decilm.py`` that ``auto_map`` also names is not shipped (a Nemotron-NAS checkpoint's, for ``AutoModelForCausalLM``) |
| ``mlc-chat-config.json`` | one shape for every layer, a head count that divides ``hidden_size``, no sliding window | MLC-LLM (``mlc_llm compile`` / ``serve``) |
| ``amoeballm_flags.txt`` | the pick came from the (num_layers, width) grid | AmoebaLLM's evaluation |
| ``export.json`` | always | people: each file and its readers, every adjustment, every file not written and why |

Every ``config.json`` starts from the model's own: the ``config.json`` the table was built from (its
sidecar's ``source_config``), or for a built-in model the config it stands for. A field the pick
does not change is carried as it is (``rope_scaling``, special-token ids, ``tie_word_embeddings``,
``sliding_window``, ``model_type``, ...); ``export.json`` lists every field that differs from that
source (``config_changes``: field, source and exported value, why) and every source field a written
file cannot express (``not_expressed``), so the exported config loads as the source model with
exactly the listed changes.

Why two forms of ``config.json``: transformers 5.x ``LlamaConfig.validate_architecture`` refuses a
``hidden_size`` that is not a multiple of ``num_attention_heads``, whatever ``head_dim`` says, and
MLC-LLM's ``LlamaModel`` asserts the same; pruning TinyLlama to width 3/4 or 5/8 (24 heads) or
llama2-7b to any width below 1 breaks it. ``head_dim`` is still written explicitly, so a head count
that divides ``hidden_size`` with another quotient (TinyLlama at 16 heads of 64) loads right.

The DeciLM form (schema from TensorRT-LLM ``tensorrt_llm/models/nemotron_nas/convert.py``,
``hf_block_config_to_layer_config``, and ``_torch/models/modeling_nemotron_nas.py``; the HF
``block_config.py`` dataclasses) keeps ``num_attention_heads`` model-wide. Per layer,
``attention.n_heads_in_group`` gives kv heads = ``num_attention_heads // n_heads_in_group`` and
``ffn.ffn_mult`` gives the FFN width as the multiple of 256 at or above
``int(2 * ffn_mult * hidden_size / 3)`` (``BlockConfig`` rounds ``ffn_mult`` to 6 decimals). So:

- a pick whose kept layers differ in query heads cannot be written in either form:
  ``UnsupportedShape`` names the first layer that differs, before any file is written;
- an FFN width that is not a multiple of 256 is written as the next multiple of 256, and
  ``export.json`` lists each such layer with both widths (zero-filled extra channels compute the
  same function, but the deployed latency is that of the wider FFN);
- TensorRT-LLM's TensorRT-engine converter (``DeciConfig.from_hugging_face``) passes no head size and
  so derives ``hidden_size / num_attention_heads``: a head count that does not divide
  ``hidden_size`` loads there wrongly, and only in its PyTorch flow (which reads ``head_dim``);
  ``export.json`` says so when it applies.

Sources read: TensorRT-LLM ``models/nemotron_nas/convert.py`` @2a9abd95, ``config.py`` @42a7b092,
``_torch/models/modeling_nemotron_nas.py`` @0193dbd4, ``_torch/modules/attention.py`` @00547a25
(``version.py`` 1.0.0rc4); MLC-LLM ``python/mlc_llm/model/llama/llama_model.py`` and
``protocol/mlc_chat_config.py`` @01ced331, ``interface/gen_config.py`` @00c44c3c.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from amoeba_profile.core.arch import BUILTIN_ARCHS, LLAMA2_TOKEN_IDS, ModelArch, from_hf_config, hf_config
from amoeba_profile.core.errors import ArchError, LutError, UnsupportedShape
from amoeba_profile.core.files import write_file_atomically
from amoeba_profile.core.inputs import output_dir
from amoeba_profile.core.subnet import Subnet

# The readers round FFN widths up to this multiple (``_find_multiple(..., 256)``).
DECI_FFN_MULTIPLE = 256
# MLC-LLM's protocol/mlc_chat_config.py MLC_CHAT_CONFIG_VERSION and its weight-format names.
MLC_CHAT_CONFIG_VERSION = "0.1.0"
MLC_QUANTIZATION = {"float16": "q0f16", "bfloat16": "q0bf16", "float32": "q0f32"}
# The config class a DeciLM-form folder ships, as the module ``deci_config``'s ``auto_map`` names it.
DECI_CONFIG_MODULE = "configuration_decilm.py"
# LLaMA-2 / TinyLlama tokenizer ids (MLC-LLM's system defaults are the same): the end id a backend's
# serving loop passes while it ignores end-of-sequence.
BOS_TOKEN_ID, EOS_TOKEN_ID = LLAMA2_TOKEN_IDS
_ABSENT = object()


@dataclass(frozen=True)
class ExportedFile:
    name: str
    form: str
    readers: str


@dataclass(frozen=True)
class ConfigChange:
    """A field of the exported ``config.json`` that differs from the source config, or that the
    export adds (``in_source`` False)."""

    field: str
    in_source: bool
    source: Any
    exported: Any
    why: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "field": self.field,
            **({"source": self.source} if self.in_source else {}),
            "exported": self.exported,
            "why": self.why,
        }


@dataclass(frozen=True)
class ExportReport:
    """What ``export_subnet`` wrote: the files with their readers, where a written shape differs
    from the pick (``adjustments``), and the files it did not write with the reason (``skipped``);
    the config it started from (``config_source``), every config.json field that differs from it
    (``config_changes``) and every source field a written file cannot express (``not_expressed``)."""

    folder: Path
    files: tuple[ExportedFile, ...]
    adjustments: tuple[str, ...]
    skipped: tuple[str, ...]
    subnet_id: str = ""
    config_source: str = ""
    config_changes: tuple[ConfigChange, ...] = ()
    not_expressed: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "folder": str(self.folder),
            "subnet_id": self.subnet_id,
            "files": [{"name": f.name, "form": f.form, "readers": f.readers} for f in self.files],
            "config_source": self.config_source,
            "config_changes": [c.to_dict() for c in self.config_changes],
            "not_expressed": list(self.not_expressed),
            "adjustments": list(self.adjustments),
            "skipped": list(self.skipped),
        }


def source_config(arch: ModelArch, recorded: dict[str, Any] | None) -> tuple[dict[str, Any], str, list[str]]:
    """(the config an export starts from, where it comes from, notes for export.json).

    ``recorded`` is the config.json a table was built from (its sidecar's ``source_config``) and
    must describe ``arch``. Without one, a built-in model's own config stands in; any other model's
    fields beyond its sizes are unknown, and the note says which defaults were written instead."""
    if recorded is not None:
        try:
            described = from_hf_config(recorded, arch.name, "the table's source_config")
        except ArchError as exc:
            raise LutError(f"{exc}; the sidecar's source_config cannot be exported") from None
        if described != arch:
            raise LutError(
                f"the table's source_config describes another model than its arch ({arch.name}): "
                "rebuild the table from the model's config.json"
            )
        return dict(recorded), "the config.json the table was built from (its sidecar's source_config)", []
    base = hf_config(arch)
    if BUILTIN_ARCHS.get(arch.name) == arch:
        return base, f"the built-in model {arch.name}", []
    return (
        base,
        "the table's architecture (the table records no source config.json)",
        [
            "the table records no source config.json (built before amoeba-profile recorded it, or by a fleet): fields "
            f"beyond the sizes are LLaMA-2 defaults (bos_token_id {base['bos_token_id']}, eos_token_id "
            f"{base['eos_token_id']}, no rope_scaling, no sliding window); compare config.json with your model's, or "
            "rebuild the table with build-lut --model CONFIG"
        ],
    )


def _dtype_field(base: dict[str, Any]) -> str:
    """transformers 5 writes ``dtype``, earlier versions ``torch_dtype``: keep the source's spelling."""
    return "dtype" if "dtype" in base and "torch_dtype" not in base else "torch_dtype"


def _amoeba_fields(subnet: Subnet) -> dict[str, Any]:
    return {
        "amoeba_kept_layers": subnet.kept_indices,
        "amoeba_base_model": subnet.arch.name,
        "amoeba_subnet_id": subnet.id,
    }


_WHY = {
    "num_hidden_layers": "layers dropped; amoeba_kept_layers lists the base layers kept",
    "num_attention_heads": "query heads pruned",
    "num_key_value_heads": "key/value heads pruned",
    "intermediate_size": "FFN channels pruned",
    "head_dim": "written explicitly: readers derive hidden_size / num_attention_heads otherwise, which is wrong once "
    "heads are pruned",
    "torch_dtype": "the dtype the latency table was measured in",
    "dtype": "the dtype the latency table was measured in",
    "amoeba_kept_layers": "added: the base layers the pick keeps",
    "amoeba_base_model": "added: the base model the pick is cut from",
    "amoeba_subnet_id": "added: the pick's subnet id",
}
_DECI_WHY = {
    "architectures": "the DeciLM / Nemotron-NAS form, which holds a shape per layer",
    "model_type": "the DeciLM / Nemotron-NAS form, which holds a shape per layer",
    "auto_map": "the DeciLM / Nemotron-NAS form: transformers loads it with the checkpoint's remote code",
    "block_configs": "per-layer kv heads (n_heads_in_group) and FFN widths (ffn_mult)",
    "intermediate_size": "per layer in block_configs (DeciLMConfig sets it to None itself)",
    "num_key_value_heads": "per layer in block_configs (DeciLMConfig sets it to None itself)",
    "num_attention_heads": "query heads pruned (one count for every layer)",
}
_DECI_DEFAULT = "added with LLaMA's default: the DeciLM / Nemotron-NAS readers read the field"
_DECI_DEFAULTS = {
    "hidden_act": "silu",
    "rope_scaling": None,
    "attention_bias": False,
    "mlp_bias": False,
    "pretraining_tp": 1,
}  # LLaMA's defaults, for fields the DeciLM readers read


def config_changes(base: dict[str, Any], config: dict[str, Any], why: dict[str, str]) -> list[ConfigChange]:
    """Every field of ``config`` whose value differs from ``base`` or that ``base`` lacks, with ``why``."""
    changes = []
    for field, value in config.items():
        source = base.get(field, _ABSENT)
        if source is _ABSENT or source != value:
            changes.append(
                ConfigChange(
                    field,
                    source is not _ABSENT,
                    None if source is _ABSENT else source,
                    value,
                    why.get(field, "set by the export"),
                )
            )
    return changes


def query_heads(subnet: Subnet) -> int:
    """The one query-head count every deployment form needs, or UnsupportedShape naming the layer."""
    first = subnet.layers[0]
    for layer in subnet.layers[1:]:
        if layer.heads != first.heads:
            raise UnsupportedShape(
                f"layer {layer.index} has {layer.heads} query heads and layer {first.index} has {first.heads}: "
                "LLaMA and DeciLM/Nemotron-NAS configs keep one query-head count per model; choose a shape with "
                "one head count (a uniform pick, or --per-layer on a table of a flow that takes one, e.g. tensorrt-llm)"
            )
    return first.heads


def loads_as_llama(subnet: Subnet) -> bool:
    """Whether transformers 5.x (and MLC-LLM) accept the pick as a plain LLaMA config."""
    return subnet.is_uniform and subnet.arch.hidden_size % query_heads(subnet) == 0


def llama_config(subnet: Subnet, dtype: str, source: dict[str, Any] | None = None) -> dict[str, Any]:
    """The plain LLaMA (or Mistral) config.json: the source config with the pick's shape."""
    arch, layer = subnet.arch, subnet.layers[0]
    base = source_config(arch, source)[0]
    return {
        **base,
        "intermediate_size": layer.ffn,
        "num_attention_heads": layer.heads,
        "num_key_value_heads": layer.kv_heads,
        "head_dim": arch.head_dim,
        "num_hidden_layers": subnet.num_layers,
        _dtype_field(base): dtype,
        **_amoeba_fields(subnet),
    }


def ffn_mult(ffn: int, hidden_size: int) -> tuple[float, int]:
    """(ffn_mult, the FFN width the readers build from it): the smallest multiple of 256 >= ffn.

    ffn_mult = 1.5 x width / hidden_size, rounded to 6 decimals as BlockConfig does; that moves
    2 x ffn_mult x hidden_size / 3 by less than 1 for any hidden_size below 3e6, so the readers'
    truncate-then-round-up lands back on the width."""
    width = math.ceil(ffn / DECI_FFN_MULTIPLE) * DECI_FFN_MULTIPLE
    return round(1.5 * width / hidden_size, 6), width


def deci_config(subnet: Subnet, dtype: str, source: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[str]]:
    """The DeciLM / Nemotron-NAS config (the source config's other fields carried) and the
    adjustments made to fit its schema."""
    arch, heads = subnet.arch, query_heads(subnet)
    base = source_config(arch, source)[0]
    blocks, adjustments = [], []
    for layer in subnet.layers:
        mult, built = ffn_mult(layer.ffn, arch.hidden_size)
        if built != layer.ffn:
            adjustments.append(
                f"layer {layer.index}: FFN {layer.ffn} written as {built} (ffn_mult {mult:g}; the "
                f"readers round FFN widths up to a multiple of {DECI_FFN_MULTIPLE})"
            )
        blocks.append(
            {
                "attention": {
                    "n_heads_in_group": layer.heads // layer.kv_heads,
                    "no_op": False,
                    "replace_with_linear": False,
                },
                "ffn": {"ffn_mult": mult, "no_op": False, "replace_with_linear": False},
            }
        )
    config = {
        **{field: value for field, value in _DECI_DEFAULTS.items() if field not in base},
        **base,
        "architectures": ["DeciLMForCausalLM"],
        "model_type": "nemotron-nas",
        "auto_map": {
            "AutoConfig": "configuration_decilm.DeciLMConfig",
            "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM",
        },
        "num_attention_heads": heads,
        "head_dim": arch.head_dim,
        "intermediate_size": None,
        "num_key_value_heads": None,
        "num_hidden_layers": subnet.num_layers,
        "block_configs": blocks,
        _dtype_field(base): dtype,
        **_amoeba_fields(subnet),
    }
    return config, adjustments


def deci_config_module() -> str:
    """The source of ``DeciLMConfig`` (``amoeba_profile/data/configuration_decilm.py``): without it
    beside a DeciLM-form ``config.json``, ``AutoConfig.from_pretrained(folder, trust_remote_code=True)``
    fails for want of the module ``auto_map`` names."""
    return (resources.files("amoeba_profile") / "data" / DECI_CONFIG_MODULE).read_text()


def _token_ids(value: Any) -> list[Any]:
    """A config's bos/eos id (an int, a list of them, or None) as MLC-LLM's id list."""
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def mlc_chat_config(subnet: Subnet, dtype: str, source: dict[str, Any] | None = None) -> dict[str, Any]:
    """MLC-LLM's mlc-chat-config.json as ``mlc_llm gen_config`` writes it for this shape (no
    quantization, one GPU, a plain completion template: replace it with the model's chat template),
    with the source config's special-token ids and rope scaling."""
    arch, layer = subnet.arch, subnet.layers[0]
    base = source_config(arch, source)[0]
    bos, eos = base.get("bos_token_id"), base.get("eos_token_id")
    pad = base.get("pad_token_id")
    prefill_chunk = min(arch.max_position, 8192)  # LlamaConfig.__post_init__'s default
    model_config = {
        "hidden_size": arch.hidden_size,
        "intermediate_size": layer.ffn,
        "num_attention_heads": layer.heads,
        "num_hidden_layers": subnet.num_layers,
        "rms_norm_eps": arch.rms_norm_eps,
        "vocab_size": arch.vocab_size,
        "tie_word_embeddings": arch.tie_embeddings,
        "position_embedding_base": arch.rope_theta,
        "rope_scaling": base.get("rope_scaling"),
        "context_window_size": arch.max_position,
        "prefill_chunk_size": prefill_chunk,
        "num_key_value_heads": layer.kv_heads,
        "head_dim": arch.head_dim,
        "tensor_parallel_shards": 1,
        "pipeline_parallel_stages": 1,
        "max_batch_size": 1,
        "disaggregation": False,
    }
    return {
        "version": MLC_CHAT_CONFIG_VERSION,
        "model_type": "llama",
        "quantization": MLC_QUANTIZATION[dtype],
        "model_config": model_config,
        "vocab_size": arch.vocab_size,
        "context_window_size": arch.max_position,
        "sliding_window_size": -1,
        "prefill_chunk_size": prefill_chunk,
        "attention_sink_size": -1,
        "tensor_parallel_shards": 1,
        "pipeline_parallel_stages": 1,
        "active_vocab_size": arch.vocab_size,
        "temperature": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "repetition_penalty": 1.0,
        "top_p": 1.0,
        "tokenizer_files": [],
        "tokenizer_info": {},
        "conv_template": {
            "name": "completion",
            "system_template": "{system_message}",
            "system_message": "",
            "system_prefix_token_ids": _token_ids(bos),
            "add_role_after_system_message": True,
            "roles": {"user": "", "assistant": ""},
            "role_templates": {"user": "{user_message}", "assistant": "{assistant_message}", "tool": "{tool_message}"},
            "messages": [],
            "seps": [""],
            "role_content_sep": "",
            "role_empty_sep": "",
            "stop_str": [],
            "stop_token_ids": _token_ids(eos),
            "function_string": "",
            "use_function_calling": False,
        },
        "pad_token_id": pad if pad is not None else 0,
        "bos_token_id": bos,
        "eos_token_id": eos,
    }


def amoeballm_flags(subnet: Subnet) -> str | None:
    if subnet.width_ratio is None:
        return None
    return f"--eval_num_layer {subnet.num_layers} --eval_num_width {subnet.width_ratio:g}"


LLAMA_READERS = "transformers AutoConfig / AutoModelForCausalLM; TensorRT-LLM, vLLM and MLC-LLM convert_weight (LLaMA)"
DECI_READERS = (
    "TensorRT-LLM (PyTorch flow: _torch/models/modeling_nemotron_nas.py; converter: "
    "models/nemotron_nas); transformers AutoConfig with trust_remote_code (configuration_decilm.py "
    "beside it; AutoModelForCausalLM needs a Nemotron-NAS checkpoint's modeling_decilm.py)"
)


def export_subnet(
    subnet: Subnet, out_dir: Path | str, dtype: str, source: dict[str, Any] | None = None
) -> ExportReport:
    """Write the pick's files into ``out_dir`` (see the module docstring) and return what was
    written; UnsupportedShape, before anything is written, when no deployment form fits.

    ``source`` is the config.json the pick's table was built from (``Lut.meta.source_config``):
    every field the pick does not change is carried from it."""
    heads = query_heads(subnet)
    as_llama = loads_as_llama(subnet)
    base, origin, notes = source_config(subnet.arch, source)
    window = base.get("sliding_window")
    files = [ExportedFile("subnet.json", "amoeba-profile subnet", "amoeba_profile Subnet.from_json")]
    adjustments: list[str] = list(notes)
    skipped: list[str] = []
    not_expressed: list[str] = []
    contents: dict[str, str] = {"subnet.json": json.dumps(subnet.to_dict(), indent=2)}
    if as_llama:
        config = llama_config(subnet, dtype, source)
        changes = config_changes(base, config, _WHY)
        files.append(ExportedFile("config.json", str(config["model_type"]), LLAMA_READERS))
        if window is not None:
            skipped.append(
                f"mlc-chat-config.json: the source's sliding_window={window} (MLC-LLM's llama model has no "
                "sliding window; generate one with mlc_llm gen_config for a model type that has)"
            )
        else:
            contents["mlc-chat-config.json"] = json.dumps(mlc_chat_config(subnet, dtype, source), indent=2)
            files.append(ExportedFile("mlc-chat-config.json", "mlc-llm", "MLC-LLM (mlc_llm compile / serve)"))
    else:
        config, shape_adjustments = deci_config(subnet, dtype, source)
        adjustments += shape_adjustments
        changes = config_changes(base, config, {**_WHY, **_DECI_WHY, **{f: _DECI_DEFAULT for f in _DECI_DEFAULTS}})
        files.append(ExportedFile("config.json", "nemotron-nas", DECI_READERS))
        contents[DECI_CONFIG_MODULE] = deci_config_module().rstrip("\n")
        files.append(
            ExportedFile(
                DECI_CONFIG_MODULE,
                "nemotron-nas",
                "transformers AutoConfig with trust_remote_code (the DeciLMConfig class config.json's auto_map names)",
            )
        )
        why = (
            "widths differ per layer"
            if not subnet.is_uniform
            else f"{heads} query heads do not divide hidden_size {subnet.arch.hidden_size}"
        )
        skipped.append(f"plain LLaMA config.json: {why} (transformers' LlamaConfig refuses it)")
        skipped.append(
            f"mlc-chat-config.json: {why} (MLC-LLM's LlamaConfig has one shape and its LlamaModel "
            "asserts hidden_size % num_attention_heads == 0)"
        )
        if subnet.arch.hidden_size % heads:
            adjustments.append(
                f"{heads} query heads do not divide hidden_size {subnet.arch.hidden_size}: TensorRT-LLM "
                "loads this config in its PyTorch flow only (head_dim read); its TensorRT-engine "
                "converter derives hidden_size / num_attention_heads"
            )
        if window is not None:
            not_expressed.append(
                f"sliding_window={window}: the DeciLM / Nemotron-NAS form sets attention windows per "
                "block (block_configs[].attention.window_length), not model-wide; the field is kept as "
                "the source has it, and readers of this form may attend to the whole context"
            )
    contents["config.json"] = json.dumps(config, indent=2)
    flags = amoeballm_flags(subnet)
    if flags:
        contents["amoeballm_flags.txt"] = flags
        files.append(
            ExportedFile(
                "amoeballm_flags.txt", "amoeballm", "AmoebaLLM evaluation (--eval_num_layer, --eval_num_width)"
            )
        )
    out = Path(out_dir)
    report = ExportReport(
        out,
        (*files, ExportedFile("export.json", "report", "people")),
        tuple(adjustments),
        tuple(skipped),
        subnet.id,
        origin,
        tuple(changes),
        tuple(not_expressed),
    )
    contents["export.json"] = json.dumps(report.to_dict(), indent=2)
    output_dir(out, "--export")
    for name, text in contents.items():  # renamed into place: a symlink planted at a name is replaced, not followed
        write_file_atomically(out / name, (text + "\n").encode())
    return report
