"""Write a chosen subnet where deployment tools can pick it up.

- ``subnet.json``: the full spec (base arch, kept layers, per-layer heads/kv_heads/ffn, id);
- ``config.json``: a Hugging Face LLaMA config for uniform shapes (``amoeba_kept_layers`` names
  the base layers to copy weights from), or ``blocks.json`` with one block per kept layer when
  widths differ per layer (a plain HF config cannot express that);
- ``amoeballm_flags.txt``: AmoebaLLM's evaluation flags for the shape (``--eval_num_layer``,
  ``--eval_num_width``), when it came from the (num_layers, width) grid.
"""

from __future__ import annotations

import json
from pathlib import Path

from .inputs import output_dir
from .subnet import Subnet


def hf_config(subnet: Subnet, dtype: str) -> dict:
    arch, layer = subnet.arch, subnet.layers[0]
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": arch.hidden_size, "intermediate_size": layer.ffn, "num_attention_heads": layer.heads,
        "num_key_value_heads": layer.kv_heads, "head_dim": arch.head_dim, "num_hidden_layers": subnet.num_layers,
        "vocab_size": arch.vocab_size, "rms_norm_eps": arch.rms_norm_eps, "rope_theta": arch.rope_theta,
        "max_position_embeddings": arch.max_position, "tie_word_embeddings": arch.tie_embeddings, "torch_dtype": dtype,
        "amoeba_kept_layers": subnet.kept_indices, "amoeba_base_model": arch.name, "amoeba_subnet_id": subnet.id,
    }


def block_spec(subnet: Subnet) -> dict:
    return {
        "base_model": subnet.arch.name, "subnet_id": subnet.id, "num_hidden_layers": subnet.num_layers,
        "hidden_size": subnet.arch.hidden_size, "head_dim": subnet.arch.head_dim,
        "blocks": [{"source_layer": l.index, "num_attention_heads": l.heads, "num_key_value_heads": l.kv_heads,
                    "intermediate_size": l.ffn} for l in subnet.layers],
    }


def amoeballm_flags(subnet: Subnet) -> str | None:
    if subnet.width_ratio is None:
        return None
    return f"--eval_num_layer {subnet.num_layers} --eval_num_width {subnet.width_ratio:g}"


def export_subnet(subnet: Subnet, out_dir: Path | str, dtype: str) -> list[Path]:
    out = output_dir(out_dir, "--export")
    written = [out / "subnet.json"]
    written[0].write_text(json.dumps(subnet.to_dict(), indent=2) + "\n")
    if subnet.is_uniform:
        path = out / "config.json"
        path.write_text(json.dumps(hf_config(subnet, dtype), indent=2) + "\n")
    else:
        path = out / "blocks.json"
        path.write_text(json.dumps(block_spec(subnet), indent=2) + "\n")
    written.append(path)
    flags = amoeballm_flags(subnet)
    if flags:
        written.append(out / "amoeballm_flags.txt")
        written[-1].write_text(flags + "\n")
    return written
