"""Model specifications: plain data that rebuilds the exact module."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from .classic_layout import plan

ARCHITECTURES = ("convnet", "resnet10", "resnet18", "vgg11", "alexnet")
DEFAULT_WIDTH = {"convnet": 128, "resnet10": 64, "resnet18": 64, "vgg11": 64, "alexnet": 128}  # the references
NORMS = ("instance", "batch", "none")
POOLINGS = ("avg", "max", "none")
ACTIVATIONS = ("relu", "leakyrelu", "sigmoid")


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a network: ``build_model(ModelSpec.from_dict(spec.to_dict()))``.

    ``depth``, ``pooling`` and ``activation`` apply to ConvNet; ResNets use their
    fixed block layout and only read ``norm`` and ``width`` (the stem width, 64 in
    the reference ResNet-18).
    """

    arch: str = "convnet"
    channels: int = 3
    num_classes: int = 10
    resolution: tuple[int, int] = (32, 32)
    width: int | None = None  # None: the reference's (DEFAULT_WIDTH: ConvNet 128, ResNet stem 64, ...)
    depth: int | None = None  # None: default_depth(resolution) — 3 for 28/32 px as in the reference
    norm: str | None = None  # None: instance, or none for AlexNet (the references)
    pooling: str = "avg"
    activation: str = "relu"

    def __post_init__(self) -> None:
        res = self.resolution
        if isinstance(res, int):
            object.__setattr__(self, "resolution", (res, res))
        elif isinstance(res, list):
            object.__setattr__(self, "resolution", tuple(res))
        _check_choice("arch", self.arch, ARCHITECTURES)
        if self.width is None:
            object.__setattr__(self, "width", DEFAULT_WIDTH[self.arch])
        if self.norm is None:
            object.__setattr__(self, "norm", "none" if self.arch == "alexnet" else "instance")
        if self.depth is None:
            object.__setattr__(self, "depth", default_depth(self.resolution) if self.arch == "convnet" else 3)
        _check_choice("norm", self.norm, NORMS)
        _check_choice("pooling", self.pooling, POOLINGS)
        _check_choice("activation", self.activation, ACTIVATIONS)
        for key in ("channels", "num_classes", "width", "depth"):
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"model {key}={value!r} is invalid: expected a positive integer")
        if len(self.resolution) != 2 or min(self.resolution) <= 0:
            raise ValueError(f"model resolution={self.resolution!r} is invalid: expected (height, width) > 0")
        if self.arch in ("vgg11", "alexnet"):
            final = plan(self.arch, self.channels, self.resolution, self.width)[2]
            if min(final) < 1:
                raise ValueError(f"model {self.arch} does not fit {self.resolution[0]}x{self.resolution[1]} images: "
                                 f"its max-pools leave no pixel (vgg11 needs at least 32x32, alexnet 8x8)")
        if self.norm == "instance" and min(self.last_norm_map()) <= 1:
            fix = "norm=batch (" + self.replace(norm="batch").name + ")" + (
                " or a shallower ConvNet" if self.arch == "convnet" else "") + " or larger images"
            raise ValueError(f"model {self.name} on {self.resolution[0]}x{self.resolution[1]} images "
                             f"instance-normalises 1x1 feature maps in its last block, so every image gets the "
                             f"same output: use {fix}")

    def last_norm_map(self) -> tuple[int, int]:
        """(height, width) of the feature map at the network's last normalisation layer: ConvNet normalises
        before each block's pooling; a ResNet's last stage has had three stride-2 convolutions; VGG-11 and
        AlexNet normalise after their last convolution."""
        if self.arch in ("vgg11", "alexnet"):
            return plan(self.arch, self.channels, self.resolution, self.width)[1]
        if self.arch == "convnet":
            halvings = 0 if self.pooling == "none" else self.depth - 1
            return tuple(side // 2**halvings for side in self.resolution)
        sides = list(self.resolution)
        for _ in range(3):
            sides = [(side - 1) // 2 + 1 for side in sides]
        return tuple(sides)

    @property
    def name(self) -> str:
        """Short stable name, used in store paths, e.g. ``convnet3-w128-in`` or ``resnet18-bn``."""
        norm = {"instance": "in", "batch": "bn", "none": "nn"}[self.norm]
        if self.arch == "convnet":
            return f"convnet{self.depth}-w{self.width}-{norm}"
        return f"{self.arch}-{norm}" + ("" if self.width == DEFAULT_WIDTH[self.arch] else f"-w{self.width}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["resolution"] = list(self.resolution)
        out["name"] = self.name
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelSpec":
        fields = {k: v for k, v in data.items() if k != "name"}
        unknown = set(fields) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown model spec keys {sorted(unknown)}: accepted {sorted(cls.__dataclass_fields__)}")
        return cls(**fields)

    def replace(self, **changes: Any) -> "ModelSpec":
        return replace(self, **changes)


_NORM_CODES = {"in": "instance", "bn": "batch", "nn": "none"}


def fields_from_name(name: str) -> dict[str, Any]:
    """The ModelSpec fields a ``ModelSpec.name`` fixes (arch, depth, width, norm): the inverse of ``name``.

    >>> fields_from_name("convnet3-w128-in")
    {'arch': 'convnet', 'depth': 3, 'width': 128, 'norm': 'instance'}
    """
    parts = str(name).split("-")
    try:
        if parts[0].startswith("convnet") and len(parts) == 3 and parts[1].startswith("w"):
            return {"arch": "convnet", "depth": int(parts[0][len("convnet"):]), "width": int(parts[1][1:]),
                    "norm": _NORM_CODES[parts[2]]}
        if parts[0] in ARCHITECTURES and len(parts) in (2, 3):
            width = int(parts[2][1:]) if len(parts) == 3 and parts[2].startswith("w") else DEFAULT_WIDTH[parts[0]]
            if len(parts) == 3 and not parts[2].startswith("w"):
                raise ValueError
            return {"arch": parts[0], "width": width, "norm": _NORM_CODES[parts[1]]}
    except (KeyError, ValueError):
        pass
    raise ValueError(f"model name {name!r} is not a ModelSpec name such as convnet3-w128-in or resnet18-bn")


def _check_choice(key: str, value: Any, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise ValueError(f"unknown model {key} {value!r}: accepted {', '.join(accepted)}")


def default_depth(resolution: tuple[int, int]) -> int:
    """ConvNet depth used by the reference codes: 3 up to 32 px, 4 at 64 px, 5 at 128 px.

    8 px images (scikit-learn digits) get 2 blocks: a third would instance-normalise 2x2
    maps, which makes trajectory matching through unrolled steps erratic.
    """
    side = max(resolution)
    if side <= 8:
        return 2
    if side <= 32:
        return 3
    if side <= 64:
        return 4
    return 5
