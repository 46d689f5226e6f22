"""The layer layout of VGG-11 and AlexNet (``raydd.models.classic``) as plain data, without torch: what
``ModelSpec`` checks a model against (does it fit the images, how large is its last normalised map) and
what ``ClassicNet`` builds."""
from __future__ import annotations

LAYERS = {  # channels at the reference width, or "M" (2x2 max-pool); (channels, kernel) for AlexNet
    "vgg11": ((64, 3), "M", (128, 3), "M", (256, 3), (256, 3), "M", (512, 3), (512, 3), "M", (512, 3), (512, 3), "M"),
    "alexnet": ((128, 5), "M", (192, 5), "M", (256, 3), (192, 3), (192, 3), "M"),
}
REFERENCE_WIDTH = {"vgg11": 64, "alexnet": 128}
FIRST_PAD_28 = {"vgg11": 3, "alexnet": 4}  # 28x28 one-channel inputs: the maps of 32x32 ones


def plan(arch: str, channels: int, resolution: tuple[int, int], width: int):
    """The layers of ``arch`` as (in, out, kernel, padding) convolutions and "M" pools, with the map sides
    at the last convolution (its norm) and at the end."""
    layers, in_ch, sides, last_conv = [], channels, list(resolution), list(resolution)
    mnist_like = channels == 1 and tuple(resolution) == (28, 28)
    for i, item in enumerate(LAYERS[arch]):
        if item == "M":
            layers.append("M")
            sides = [s // 2 for s in sides]
            continue
        ref_channels, kernel = item
        out = max(1, ref_channels * width // REFERENCE_WIDTH[arch])
        pad = FIRST_PAD_28[arch] if i == 0 and mnist_like else kernel // 2
        layers.append((in_ch, out, kernel, pad))
        sides = last_conv = [s + 2 * pad - kernel + 1 for s in sides]
        in_ch = out
    return layers, tuple(last_conv), tuple(sides)
