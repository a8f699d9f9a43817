"""Typed configuration: one dataclass per section, loaded from YAML, every field with a default.

A config file holds any subset of the sections below; unknown keys and values of the wrong type fail with a
`ConfigError` that names the key (`model.rrdb_num_block: expected int, got 'many'`).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names the key."""


@dataclass
class ModelConfig:
    scale: int = 4  # super-resolution factor: 2, 3, 4 or 8
    in_channels: int = 3
    # RRDB LR encoder (BasicSR names)
    rrdb_num_feat: int = 64
    rrdb_num_block: int = 23
    rrdb_num_grow_ch: int = 32
    rrdb_feature_blocks: list[int] = field(default_factory=lambda: [1, 8, 15, 22])  # counted from 0
    encoder_checkpoint: Optional[str] = None  # pretrained RRDB (encoder stage checkpoint or exported file)
    freeze_encoder: bool = False
    # U-Net with BigGAN residual blocks
    unet_base_channels: int = 128
    unet_channel_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2])
    unet_num_res_blocks: int = 2
    unet_attention_levels: list[int] = field(default_factory=lambda: [3])  # levels (0 = full size) with self-attention
    unet_num_heads: int = 4
    unet_dropout: float = 0.0
    # What is diffused: "residual" r = k (HR - bicubic_up(LR)) as the reference code (k = 5), or "hr" (2 HR - 1).
    diffuse: Literal["residual", "hr"] = "residual"
    residual_scale: float = 5.0
    # Seed 004: quantized adaptive condition added to the time embedding, and the prior of its code at sampling
    # ("histogram" of training codes or "lr", a predictor from the RRDB features); "none": off.
    adaptive_condition: Literal["none", "histogram", "lr"] = "none"
    adaptive_condition_dims: int = 20  # code dimensions d (the seed: 20)
    adaptive_condition_levels: int = 2  # levels L per dimension (the seed: 2); the histogram holds L^d bins


@dataclass
class DiffusionConfig:
    beta_min: float = 0.1
    beta_max: float = 20.0
    t_min: float = 1e-3
    hybrid_c: float = 1.0  # lambda(t) = abar(t)^c; the seed picks c in [0.5, 1.5] per data set
    # The mean of the mean-reverting view (seed 003): the residual is taken against bicubic_up(LR), or against the
    # frozen encoder's regression output ("rrdb": needs model.diffuse residual and a frozen, pretrained encoder).
    mean: Literal["bicubic", "rrdb"] = "bicubic"
    # Seed 002: "structure" trains on eps' = eps + c(t) E(M), E(M) the mask's positional encoding per region
    # (needs shards from `pfsr prep --masks`); sampling is unchanged.
    noise_modulation: Literal["none", "structure"] = "none"
    noise_modulation_scale: float = 0.01  # c(t) = scale sigma(t) beta(t); 0.01: the official 100-step coefficient


@dataclass
class LossConfig:
    dsm_target: Literal["heads", "mixed"] = "heads"  # DSM on both heads (reference code) or on the mixed eps_hat
    eps_weight: float = 1.0
    x0_weight: float = 1.0
    dsm_weight: float = 1.0  # loss = dsm_weight * DSM + quality_weight * quality
    # The reference code's fine-tuning stage trains the quality loss alone (dsm_weight 0) with weight 0.5 (DIV2K,
    # ImageNet) or 1 (CelebA): ECDP lib/trainer.py lines 236-248, conf/ecdp-*-finetune.yaml line 25.
    quality_weight: float = 0.0
    quality_every: int = 1  # add the quality term every k-th step
    quality_solver: Literal["rk4", "dopri5"] = "rk4"  # the reference code: dopri5 at rtol = atol = 1e-3
    quality_steps: int = 10  # K steps of the fixed-step solver
    quality_rtol: float = 1e-3  # dopri5 only
    quality_atol: float = 1e-3
    # The quality loss's gradient also reaches the encoder (the LR features are adjoint parameters); the reference
    # code keeps the encoder out of them (ECDP lib/model/diffusion.py line 120: the U-Net's parameters only).
    quality_train_encoder: bool = True
    # "vgg19": VGG19 conv5_4 features, L1 (needs torchvision's vgg19-dcbb9e9d.pth: quality_vgg19_weights, or None
    # to take it from torch hub's checkpoints folder, $TORCH_HOME/hub/checkpoints);
    # "laplacian": weight-free L1 over a Laplacian pyramid, works offline.
    quality_features: Literal["vgg19", "laplacian"] = "laplacian"
    quality_vgg19_weights: Optional[str] = None
    # "laplacian" only: adds this weight times an L1 between the local energies (mean |band| per 8 x 8 window) of
    # the pyramid's bands, which asks for the HR's amount of detail but not its exact phase; 0: the plain L1.
    quality_detail_weight: float = 0.0


@dataclass
class SamplerConfig:
    method: str = "pf_ode"
    steps: Optional[int] = None
    rtol: float = 1e-4
    atol: float = 1e-4


@dataclass
class DataConfig:
    train: Optional[str] = None  # shard directory / s3:// prefix (pfsr prep output)
    val: Optional[str] = None
    crop: int = 64  # HR crop size (a multiple of the scale and of the U-Net depth)
    batch_size: int = 8
    shuffle_buffer: int = 256
    num_workers: int = 1
    augment: bool = True  # flips and 90-degree rotations
    # LR made on the device (pfsr.degradation.DEGRADATIONS): the seed's pure bicubic, or blur + noise + JPEG.
    degradation: Literal["bicubic", "blur_noise_jpeg"] = "bicubic"
    val_images: int = 4
    # Validation while training center-crops HR images to at most this side (0: whole images), so its time and
    # memory stay bounded (the U-Net's attention on a whole large image may need many GB on a CPU); full-image
    # scores come from `pfsr evaluate`.
    val_max_size: int = 256


@dataclass
class TrainConfig:
    stage: Literal["encoder", "diffusion", "quality", "inversion"] = "diffusion"
    steps: int = 1000
    lr: float = 1e-4
    warmup_steps: int = 500
    lr_decay_steps: list[int] = field(default_factory=list)  # multiply lr by lr_decay_factor at these steps
    lr_decay_factor: float = 0.5
    grad_clip: float = 10.0
    ema_decay: float = 0.999
    # TensorFlow's ExponentialMovingAverage with num_updates: a run of a few thousand steps does not keep a large
    # share of its initial weights in the EMA (0.999 ** 1300 = 27%). Short fine-tuning from trained weights
    # (--init) may rather keep them: `pfsr demo` turns it off.
    ema_warmup: bool = True  # EMA decay at step n: min(ema_decay, (1 + n) / (10 + n)); false: ema_decay throughout
    bf16: bool = True  # bf16 autocast for the DSM step on GPU
    seed: int = 0
    log_every: int = 10
    val_every: int = 200
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    max_failures: int = 3
    val_sampler: str = "dpmpp_2m"
    val_steps: int = 10
    torch_threads: int = 0  # per worker; 0 = the CPUs Ray reserves per worker (--cpus-per-worker)


@dataclass
class InversionConfig:
    # Start times t* of the inversion stage (seed 001): InvSR's SD-Turbo steps {250, 200, 150, 100} matched by
    # signal-to-noise ratio; training draws one per sample, sampler invsr starts from the first.
    t_stars: list[float] = field(default_factory=lambda: [0.1942, 0.1636, 0.1329, 0.1011])
    num_feat: int = 32  # width of the noise predictor
    num_block: int = 2  # its residual blocks (LR resolution)


@dataclass
class ServeConfig:
    max_batch_size: int = 4
    batch_wait_timeout_s: float = 0.05
    max_ongoing_requests: int = 8
    max_queued_requests: int = 16
    max_pixels: int = 512 * 512  # input pixels
    tile: int = 128  # input tile size for large images (LR pixels)
    tile_overlap: int = 16
    # Peak resident memory of one process that super-resolves (`pfsr upscale`, an evaluate or Serve replica), MB:
    # the tiles solved together follow from it (and the tile shrinks when one does not fit), so memory stays
    # bounded at any image size; about 768 MB of it is the runtime and the model (on a GPU: of the GPU's memory).
    memory_budget_mb: int = 2048
    size_bucket: int = 16  # LR sides padded up to a multiple of this, so that near sizes share a batch
    max_nfe: int = 200  # network evaluations per request (all its tiles); more -> 400
    max_seconds: float = 120.0  # solver time per request; more -> 503
    default_sampler: str = "dpmpp_2m"
    default_steps: int = 10
    token_env: str = "PFSR_TOKEN"  # bearer token read from this environment variable when set
    min_replicas: int = 1
    max_replicas: int = 2


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    inversion: InversionConfig = field(default_factory=InversionConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> "Config":
        m = self.model
        _check(m.scale in (2, 3, 4, 8), "model.scale", f"must be 2, 3, 4 or 8, got {m.scale}")
        _check(all(0 <= b < m.rrdb_num_block for b in m.rrdb_feature_blocks), "model.rrdb_feature_blocks",
               f"block indices must lie in [0, {m.rrdb_num_block - 1}], got {m.rrdb_feature_blocks}")
        _check(len(m.rrdb_feature_blocks) > 0, "model.rrdb_feature_blocks", "must name at least one block")
        _check(len(m.unet_channel_mult) > 0, "model.unet_channel_mult", "must have at least one level")
        _check(all(0 <= a < len(m.unet_channel_mult) for a in m.unet_attention_levels),
               "model.unet_attention_levels", f"levels must lie in [0, {len(m.unet_channel_mult) - 1}]")
        d = self.diffusion
        _check(0 < d.t_min < 1, "diffusion.t_min", f"must lie in (0, 1), got {d.t_min}")
        _check(0 < d.beta_min < d.beta_max, "diffusion.beta_max", "need 0 < beta_min < beta_max")
        _check(d.hybrid_c > 0, "diffusion.hybrid_c", f"must be positive, got {d.hybrid_c}")
        _check(m.adaptive_condition_dims >= 1, "model.adaptive_condition_dims", "must be >= 1")
        _check(m.adaptive_condition_levels >= 2, "model.adaptive_condition_levels", "must be >= 2")
        _check(m.adaptive_condition_levels ** m.adaptive_condition_dims <= 2**24, "model.adaptive_condition_dims",
               "levels^dims (the histogram's bins) must be at most 2^24")
        _check(self.loss.quality_steps >= 1, "loss.quality_steps", "must be >= 1")
        _check(self.loss.quality_every >= 1, "loss.quality_every", "must be >= 1")
        _check(self.loss.quality_detail_weight >= 0, "loss.quality_detail_weight",
               f"must be >= 0, got {self.loss.quality_detail_weight}")
        _check(self.loss.quality_detail_weight == 0 or self.loss.quality_features == "laplacian",
               "loss.quality_detail_weight", "is a term of the laplacian features: set loss.quality_features: "
               "laplacian, or loss.quality_detail_weight: 0")
        _check(self.loss.dsm_weight >= 0, "loss.dsm_weight", f"must be >= 0, got {self.loss.dsm_weight}")
        _check(self.loss.dsm_weight > 0 or self.train.stage == "encoder" or
               (self.loss.quality_weight > 0 and self.loss.quality_every == 1), "loss.dsm_weight",
               "is 0, so every step needs the quality loss: set loss.quality_weight > 0 and loss.quality_every: 1")
        depth = 2 ** (len(m.unet_channel_mult) - 1)
        unit = math.lcm(m.scale, depth)
        _check(self.data.crop % unit == 0, "data.crop",
               f"must be a multiple of {unit} (the scale {m.scale} and the U-Net's {depth}), got {self.data.crop}")
        _check(self.data.batch_size >= 1, "data.batch_size", "must be >= 1")
        _check(self.train.steps >= 1, "train.steps", "must be >= 1")
        if d.mean == "rrdb":
            _check(m.diffuse == "residual", "diffusion.mean",
                   "rrdb takes the residual against the encoder's output: it needs model.diffuse: residual, not hr")
            _check(self.train.stage != "encoder" and m.freeze_encoder, "diffusion.mean",
                   "rrdb needs a frozen, pretrained encoder: train the encoder stage with diffusion.mean: bicubic "
                   "(configs/*_encoder.yaml), then this stage with model.freeze_encoder: true and --init")
        _check(len(self.inversion.t_stars) > 0 and all(0 < t < 1 for t in self.inversion.t_stars),
               "inversion.t_stars", f"must be one or more times in (0, 1), got {self.inversion.t_stars}")
        _check(self.train.lr > 0, "train.lr", "must be positive")
        _check(0 <= self.train.ema_decay < 1, "train.ema_decay", "must lie in [0, 1)")
        return self


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


_YAML11_EXPONENT = re.compile(r"[-+]?[0-9]+[eE][-+]?[0-9]+")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` (int, float, str, bool, list[...], Optional, Literal)."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {_type_name(item)}, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _YAML11_EXPONENT.fullmatch(value.strip()):
            return float(value)  # PyYAML (YAML 1.1) reads 1e-5, with no dot, as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(names)})"
            raise ConfigError(f"{path}: unknown key{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, path)
        else:
            kwargs[key] = _coerce(value, tp, path)
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any] | None) -> Config:
    return _build(Config, data or {}, "").validate()


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_yaml(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file as a dict; `base: other.yaml` (relative to the file) is read first and overlaid."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: expected a file name, got {base!r}")
    return _merge(read_yaml(path.parent / base, _seen + (path.resolve(),)), data)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Load a YAML config (None: all defaults) and apply dotted overrides like {"train.steps": 10}."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        data = read_yaml(path)
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if not key:
            raise ConfigError(f"{dotted}: overrides take the form section.key")
        data.setdefault(section, {})
        if not isinstance(data[section], dict):
            raise ConfigError(f"{section}: expected a mapping")
        data[section][key] = value
    try:
        return config_from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path is not None else str(e)) from None


def _field_comments(cls: type) -> dict[str, str]:
    """field name -> its comment in the source: the one on its line, else the comment lines right above it."""
    import inspect

    comments: dict[str, str] = {}
    above: list[str] = []
    for line in inspect.getsource(cls).splitlines()[1:]:
        if line.strip().startswith("#"):
            above.append(line.strip().lstrip("# "))
            continue
        code, _, comment = line.partition("  # ")
        stripped = code.strip()
        name = stripped.split(":", 1)[0]
        if name.isidentifier() and ":" in stripped:
            comments[name] = comment.strip() or " ".join(above)
        above = []
    return comments


def _annotation_name(tp: Any) -> str:
    """int, list[int], Optional[str], 'residual' | 'hr' (for Literal)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " \\| ".join(repr(a) for a in args)
    if origin is typing.Union or origin is types.UnionType:
        rest = [a for a in args if a is not type(None)]
        return f"Optional[{' | '.join(_annotation_name(a) for a in rest)}]" if len(rest) < len(args) else \
            " | ".join(_annotation_name(a) for a in rest)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_annotation_name(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


def config_reference() -> str:
    """Markdown table of every field with its type, default and the comment beside it (for the README)."""
    lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        hints = typing.get_type_hints(cls)
        comments = _field_comments(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            meaning = comments.get(f.name, "").replace("|", "\\|")
            lines.append(f"| `{section.name}.{f.name}` | `{_annotation_name(hints[f.name])}` | `{default!r}` | "
                         f"{meaning} |")
    return "\n".join(lines)
