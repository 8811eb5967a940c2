"""CPM-1 in the HF transformers format: a `GPT2LMHeadModel` folder.

    MODEL_DIR/
      config.json                           # GPT2Config: n_layer, n_embd, n_head, n_positions, ...
      model.safetensors | pytorch_model.bin
      spiece.model                          # optional: the sentencepiece model (CpmTokenizer)
      tokenizer_config.json, special_tokens_map.json   # with spiece.model: AutoTokenizer gives CpmTokenizer

The weights are the Megatron mp=1 tensors under other names (`NAME_MAP`, one row per
tensor, `{i}` the layer index). HF GPT-2 uses Conv1D, whose weight is stored [in, out]:
the transpose of the Linear weight [out, in] of the Megatron tensor. c_attn's output
columns are [q; k; v] like the fused mp=1 QKV rows, so a transpose is all it takes.
`lm_head.weight` is tied to `transformer.wte.weight` and is neither written nor needed.

Everything that reads user files raises `UserError` naming the file and the fix.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import zipfile
from pathlib import Path
from typing import Optional

import torch

from cpmgen.config import ModelArgs
from cpmgen.errors import UserError
from cpmgen.model import state_shapes

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
BIN_NAME = "pytorch_model.bin"
SPIECE_NAME = "spiece.model"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
SPECIAL_TOKENS_NAME = "special_tokens_map.json"

# transformers' CpmTokenizer (an XLNet-style sentencepiece tokenizer) with CPM's special pieces,
# as the CPM-Generate release configures it.
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "<sep>",
                  "pad_token": "<pad>", "cls_token": "<cls>", "mask_token": "<mask>",
                  "additional_special_tokens": ["<eop>", "<eod>"]}
TOKENIZER_CONFIG = {"tokenizer_class": "CpmTokenizer", "do_lower_case": False, "remove_space": True,
                    "keep_accents": False, **SPECIAL_TOKENS}

# (Megatron name, HF name, HF stores it as a Conv1D weight, i.e. transposed)
NAME_MAP: tuple[tuple[str, str, bool], ...] = (
    ("word_embeddings.weight", "transformer.wte.weight", False),
    ("position_embeddings.weight", "transformer.wpe.weight", False),
    ("transformer.layers.{i}.input_layernorm.weight", "transformer.h.{i}.ln_1.weight", False),
    ("transformer.layers.{i}.input_layernorm.bias", "transformer.h.{i}.ln_1.bias", False),
    ("transformer.layers.{i}.attention.query_key_value.weight", "transformer.h.{i}.attn.c_attn.weight", True),
    ("transformer.layers.{i}.attention.query_key_value.bias", "transformer.h.{i}.attn.c_attn.bias", False),
    ("transformer.layers.{i}.attention.dense.weight", "transformer.h.{i}.attn.c_proj.weight", True),
    ("transformer.layers.{i}.attention.dense.bias", "transformer.h.{i}.attn.c_proj.bias", False),
    ("transformer.layers.{i}.post_attention_layernorm.weight", "transformer.h.{i}.ln_2.weight", False),
    ("transformer.layers.{i}.post_attention_layernorm.bias", "transformer.h.{i}.ln_2.bias", False),
    ("transformer.layers.{i}.mlp.dense_h_to_4h.weight", "transformer.h.{i}.mlp.c_fc.weight", True),
    ("transformer.layers.{i}.mlp.dense_h_to_4h.bias", "transformer.h.{i}.mlp.c_fc.bias", False),
    ("transformer.layers.{i}.mlp.dense_4h_to_h.weight", "transformer.h.{i}.mlp.c_proj.weight", True),
    ("transformer.layers.{i}.mlp.dense_4h_to_h.bias", "transformer.h.{i}.mlp.c_proj.bias", False),
    ("transformer.final_layernorm.weight", "transformer.ln_f.weight", False),
    ("transformer.final_layernorm.bias", "transformer.ln_f.bias", False),
)

LM_HEAD = "lm_head.weight"
WTE = "transformer.wte.weight"
# Causal-mask buffers that older transformers versions saved with the weights.
_HF_BUFFER = re.compile(r"^transformer\.h\.\d+\.attn\.(bias|masked_bias)$")
_MEGATRON_LAYER = re.compile(r"^transformer\.layers\.(\d+)\.")
_HF_LAYER = re.compile(r"^transformer\.h\.(\d+)\.")

# The special tokens <s> and </s> of transformers' CpmTokenizer (its bos_token and eos_token ids).
BOS_ID, EOS_ID = 1, 2


def name_pairs(num_layers: int) -> list[tuple[str, str, bool]]:
    """NAME_MAP expanded for `num_layers` layers: every (Megatron, HF, conv1d) triple."""
    pairs = []
    for megatron, hf, conv1d in NAME_MAP:
        if "{i}" in megatron:
            pairs += [(megatron.format(i=i), hf.format(i=i), conv1d) for i in range(num_layers)]
        else:
            pairs.append((megatron, hf, conv1d))
    return pairs


def _num_layers(names, pattern: re.Pattern) -> int:
    indices = [int(m.group(1)) for m in map(pattern.match, names) if m]
    return max(indices) + 1 if indices else 0


def _shape(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


def _convert(state_dict: dict, to_hf: bool) -> dict:
    """Rename every tensor by NAME_MAP and transpose the Conv1D weights; nothing else."""
    num_layers = _num_layers(state_dict, _MEGATRON_LAYER if to_hf else _HF_LAYER)
    pairs = name_pairs(num_layers)
    sources = [megatron if to_hf else hf for megatron, hf, _ in pairs]
    missing = [name for name in sources if name not in state_dict]
    unexpected = sorted(set(state_dict) - set(sources))
    if missing or unexpected:
        name = (missing or unexpected)[0]
        what = "missing" if missing else "unexpected"
        raise ValueError(f"{what} tensor {name}{_more(missing or unexpected)} for a {num_layers}-layer model")
    out = {}
    for megatron, hf, conv1d in pairs:
        source, target = (megatron, hf) if to_hf else (hf, megatron)
        tensor = state_dict[source]
        if conv1d:
            if tensor.dim() != 2:
                raise ValueError(f"tensor {source} has shape {_shape(tensor.shape)}, expected a matrix")
            tensor = tensor.t()
        out[target] = tensor.contiguous()
    assert len(out) == len(state_dict) == len(pairs)
    return out


def megatron_to_hf(state_dict: dict) -> dict:
    """Megatron mp=1 names -> GPT2LMHeadModel names (without the tied lm_head.weight)."""
    return _convert(state_dict, to_hf=True)


def hf_to_megatron(state_dict: dict) -> dict:
    """GPT2LMHeadModel (or GPT2Model) names -> Megatron mp=1 names.

    Names may lack the `transformer.` prefix; `lm_head.weight` is dropped when it equals
    wte (tied) and the old attn.bias / attn.masked_bias buffers are ignored."""
    return _convert(_canonical_hf(state_dict), to_hf=False)


def _canonical_hf(state_dict: dict) -> dict:
    """Add the `transformer.` prefix where missing, drop mask buffers and a tied lm_head."""
    out = {}
    for name, tensor in state_dict.items():
        if name != LM_HEAD and not name.startswith("transformer."):
            name = "transformer." + name
        if not _HF_BUFFER.match(name):
            out[name] = tensor
    if LM_HEAD in out:
        lm_head = out.pop(LM_HEAD)
        if WTE not in out:
            out[WTE] = lm_head  # a save that kept only one of the tied pair
        elif lm_head.shape != out[WTE].shape or not torch.equal(lm_head, out[WTE]):
            raise ValueError(f"{LM_HEAD} differs from {WTE}, but CPM-1 ties the output layer to the "
                             "word embedding; this is not a CPM-1 model")
    return out


def expected_hf_shapes(args: ModelArgs) -> dict[str, torch.Size]:
    megatron = state_shapes(args)
    pairs = name_pairs(args.num_layers)
    assert len(pairs) == len(megatron), "NAME_MAP does not cover CPMModel's state dict"
    return {hf: torch.Size(reversed(megatron[m])) if conv1d else megatron[m] for m, hf, conv1d in pairs}


# ----------------------------------------------------------------------------- reading


def is_hf_folder(path: Path) -> bool:
    """True for a folder with config.json and model.safetensors or pytorch_model.bin."""
    path = Path(path)
    return (path / CONFIG_NAME).is_file() and ((path / SAFETENSORS_NAME).is_file() or (path / BIN_NAME).is_file())


def read_hf_config(path: Path) -> dict:
    """ModelArgs fields from the folder's config.json (GPT2Config names)."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise UserError(f"{file}: not found; an HF model folder needs config.json beside the weights")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{file}: not valid UTF-8 JSON; restore config.json of the model") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{file}: not valid JSON ({e.msg} at line {e.lineno}); restore config.json of the model") from None
    if not isinstance(config, dict):
        raise UserError(f"{file}: expected a JSON object of GPT2Config fields; restore config.json of the model")

    model_type = config.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise UserError(f"{file}: model_type is {model_type!r}, but CPM-1 is a 'gpt2' model; "
                        "point to a CPM-1 GPT2LMHeadModel folder")
    activation = config.get("activation_function", "gelu_new")  # GPT2Config's default
    if activation != "gelu_new":
        raise UserError(f"{file}: activation_function is {activation!r}, but CPM-1 uses 'gelu_new' "
                        "(tanh GELU); this is not a CPM-1 model")

    def integer(*keys: str) -> int:
        for key in keys:
            value = config.get(key)
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                    raise UserError(f"{file}: {key} must be a positive integer, got {value!r}; fix config.json")
                return value
        raise UserError(f"{file}: missing {' or '.join(keys)}; a CPM-1 config.json needs "
                        "n_layer, n_embd, n_head, n_positions and vocab_size")

    result = {
        "num_layers": integer("n_layer"),
        "hidden_size": integer("n_embd"),
        "num_heads": integer("n_head"),
        "vocab_size": integer("vocab_size"),
        "max_positions": integer("n_positions", "n_ctx"),
    }
    eps = config.get("layer_norm_epsilon", 1e-5)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise UserError(f"{file}: layer_norm_epsilon must be a positive number, got {eps!r}; fix config.json")
    result["layernorm_eps"] = float(eps)

    if result["hidden_size"] % result["num_heads"]:
        raise UserError(f"{file}: n_embd {result['hidden_size']} is not a multiple of n_head "
                        f"{result['num_heads']}; fix config.json")
    n_inner = config.get("n_inner")
    if n_inner is not None and n_inner != 4 * result["hidden_size"]:
        raise UserError(f"{file}: n_inner is {n_inner!r}, but CPM-1's MLP is 4 x n_embd "
                        f"({4 * result['hidden_size']}); this is not a CPM-1 model")
    if config.get("scale_attn_by_inverse_layer_idx") or config.get("scale_attn_weights", True) is not True:
        raise UserError(f"{file}: the attention scaling differs from CPM-1's (scale_attn_weights true, "
                        "scale_attn_by_inverse_layer_idx false); this is not a CPM-1 model")
    return result


def _load_tensors(path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """The weight file (model.safetensors preferred) and its tensors, names as stored."""
    path = Path(path)
    safetensors_file, bin_file = path / SAFETENSORS_NAME, path / BIN_NAME
    if safetensors_file.is_file():
        from safetensors import safe_open

        try:
            tensors = {}
            with safe_open(str(safetensors_file), framework="pt", device="cpu") as f:
                for name in f.keys():
                    tensors[name] = f.get_tensor(name)
            return safetensors_file, tensors
        except Exception as e:  # SafetensorError, OSError, ...: header or data unreadable
            raise UserError(f"{safetensors_file}: cannot read the weights (corrupt or truncated file); "
                            "download or export the model again") from e
    if bin_file.is_file():
        try:
            # the legacy (pre-zip) torch.save format cannot be memory-mapped
            mmap = zipfile.is_zipfile(bin_file)
            tensors = torch.load(bin_file, map_location="cpu", mmap=mmap, weights_only=True)
        except pickle.UnpicklingError as e:
            if "GLOBAL" in str(e) or "Unsupported global" in str(e):
                raise UserError(f"{bin_file}: holds pickled Python objects besides tensors, which could run "
                                "code and are not loaded; re-save the model with save_pretrained "
                                "(safetensors)") from None
            raise UserError(f"{bin_file}: cannot read the weights (corrupt or truncated file); "
                            "download or export the model again") from e
        except Exception as e:
            raise UserError(f"{bin_file}: cannot read the weights (corrupt or truncated file); "
                            "download or export the model again") from e
        if isinstance(tensors, dict) and "state_dict" in tensors and isinstance(tensors["state_dict"], dict):
            tensors = tensors["state_dict"]
        if not isinstance(tensors, dict) or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()):
            raise UserError(f"{bin_file}: does not hold a state dict of named tensors; "
                            "re-save the model with save_pretrained")
        return bin_file, tensors
    raise UserError(f"{path}: no {SAFETENSORS_NAME} or {BIN_NAME}; an HF model folder needs one of them "
                    "beside config.json")


def read_hf_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The folder's weights under Megatron mp=1 names, checked against its config.json."""
    path = Path(path)
    args = ModelArgs(**read_hf_config(path))
    file, tensors = _load_tensors(path)
    try:
        tensors = _canonical_hf(tensors)
    except ValueError as e:
        raise UserError(f"{file}: {e}") from None

    expected = expected_hf_shapes(args)
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise UserError(f"{file}: missing tensor {missing[0]}{_more(missing)}; the file is incomplete "
                        "or does not match config.json")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise UserError(f"{file}: unexpected tensor {unexpected[0]}{_more(unexpected)}; the file is not a "
                        f"CPM-1 GPT2LMHeadModel with n_layer {args.num_layers} as config.json says")
    for name, shape in expected.items():
        if tensors[name].shape != shape:
            raise UserError(f"{file}: tensor {name} has shape {_shape(tensors[name].shape)}, expected "
                            f"{_shape(shape)} from config.json; the weights and config.json disagree")
        if not tensors[name].is_floating_point():
            raise UserError(f"{file}: tensor {name} has dtype {str(tensors[name].dtype).removeprefix('torch.')}, "
                            "expected a floating point type; the file is not a CPM-1 model")
    return hf_to_megatron(tensors)


# ----------------------------------------------------------------------------- writing


def hf_config(args: ModelArgs, dtype: torch.dtype) -> dict:
    """config.json of a GPT2LMHeadModel that computes what CPMModel(args) computes."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": args.vocab_size,
        "n_positions": args.max_positions,
        "n_ctx": args.max_positions,
        "n_embd": args.hidden_size,
        "n_layer": args.num_layers,
        "n_head": args.num_heads,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": args.layernorm_eps,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "use_cache": True,
        "tie_word_embeddings": True,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def write_hf(out_dir: Path, state_dict: dict, args, vocab: Optional[Path] = None) -> None:
    """Write config.json, model.safetensors (and, from `vocab`, spiece.model with the tokenizer
    configs) into `out_dir`, every file with the mode a new file gets (0644 under umask 022).

    `state_dict` holds Megatron mp=1 names matching `args`; `out_dir` exists already."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    expected = state_shapes(args)
    missing = [name for name in expected if name not in state_dict]
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(f"state dict does not match {args}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, shape in expected.items():
        if state_dict[name].shape != shape:
            raise ValueError(f"tensor {name} has shape {_shape(state_dict[name].shape)}, expected {_shape(shape)}")

    if vocab is not None and not Path(vocab).is_file():
        raise UserError(f"{vocab}: sentencepiece model not found; check the tokenizer path (chinese_vocab.model)")
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in megatron_to_hf(state_dict).items()}
    dtype = state_dict["word_embeddings.weight"].dtype
    config = out_dir / CONFIG_NAME
    config.write_text(json.dumps(hf_config(args, dtype), indent=2) + "\n", encoding="utf-8")
    save_file(tensors, str(out_dir / SAFETENSORS_NAME), metadata={"format": "pt"})
    written = [SAFETENSORS_NAME]
    if vocab is not None:
        shutil.copyfile(vocab, out_dir / SPIECE_NAME)
        (out_dir / TOKENIZER_CONFIG_NAME).write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n", encoding="utf-8")
        (out_dir / SPECIAL_TOKENS_NAME).write_text(json.dumps(SPECIAL_TOKENS, indent=2) + "\n", encoding="utf-8")
        written.append(SPIECE_NAME)
    for name in written:  # safetensors creates its file 0600; copyfile keeps the source's mode
        shutil.copymode(config, out_dir / name)
