"""The preprocess model's pixels are exactly open_clip's eval transform, on real photos."""

from __future__ import annotations

import base64
import importlib.resources
import io

import numpy as np
import pytest
import torch
from PIL import Image

from headmaster.served.preprocess import InvalidImage, decode_image, preprocess_bytes

SKIMAGE = importlib.resources.files("skimage.data")
# RGB photos of several shapes, a greyscale photo, an RGBA logo, a palette GIF, a JPEG.
FILES = [
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "camera.png",
    "logo.png",
    "no_time_for_that_tiny.gif",
    "rocket.jpg",
    "retina.jpg",
]
CONFIGS = [
    {"size": [224, 224], "resize_mode": "shortest", "interpolation": "bicubic"},  # CLIP
    {"size": [256, 256], "resize_mode": "squash", "interpolation": "bicubic"},  # SigLIP
    {"size": [224, 224], "resize_mode": "shortest", "interpolation": "bilinear"},
    {"size": [224, 224], "resize_mode": "longest", "interpolation": "bicubic", "fill_color": 0},
    {"size": [192, 256], "resize_mode": "longest", "interpolation": "bicubic", "fill_color": 128},
    {"size": [192, 256], "resize_mode": "shortest", "interpolation": "bicubic"},  # non-square crop
    {"size": [384, 384], "resize_mode": "shortest", "interpolation": "bicubic"},  # upscaling small images
]


def open_clip_pixels(data: bytes, cfg: dict) -> torch.Tensor:
    """open_clip's own eval transform, stopped before Normalize (which lives in our graph)."""
    from open_clip.transform import image_transform

    transform = image_transform(
        tuple(cfg["size"]),
        is_train=False,
        mean=(0, 0, 0),
        std=(1, 1, 1),
        resize_mode=cfg["resize_mode"],
        interpolation=cfg["interpolation"],
        fill_color=cfg.get("fill_color", 0),
    )
    return transform(Image.open(io.BytesIO(data)))


@pytest.mark.parametrize(
    "cfg", CONFIGS, ids=lambda c: f"{c['resize_mode']}-{c['size'][0]}x{c['size'][1]}-{c['interpolation']}"
)
@pytest.mark.parametrize("name", FILES)
def test_pixels_equal_open_clip_transform(name, cfg):
    data = (SKIMAGE / name).read_bytes()
    ours = preprocess_bytes(data, cfg)
    assert ours.dtype == np.uint8 and ours.shape == (3, *cfg["size"])
    theirs = open_clip_pixels(data, cfg)
    # ToTensor divides uint8 by 255 in float32; the encoder graph does the same division.
    assert torch.equal(torch.from_numpy(ours).float().div(255), theirs)


def test_image_smaller_than_the_crop_is_padded_like_open_clip():
    small = io.BytesIO()
    Image.open(io.BytesIO((SKIMAGE / "chelsea.png").read_bytes())).resize((90, 60)).save(small, "PNG")
    cfg = {"size": [224, 224], "resize_mode": "longest", "interpolation": "bicubic", "fill_color": 7}
    assert torch.equal(
        torch.from_numpy(preprocess_bytes(small.getvalue(), cfg)).float().div(255),
        open_clip_pixels(small.getvalue(), cfg),
    )


def jpeg(size=(64, 48), **save) -> bytes:
    buffer = io.BytesIO()
    photo = Image.open(io.BytesIO((SKIMAGE / "astronaut.png").read_bytes())).convert("RGB").resize(size)
    photo.save(buffer, "JPEG", **save)
    return buffer.getvalue()


def test_base64_and_data_uri_are_accepted_for_json_clients():
    raw = jpeg()
    expected = np.asarray(decode_image(raw))
    assert np.array_equal(np.asarray(decode_image(base64.b64encode(raw))), expected)
    assert np.array_equal(np.asarray(decode_image(b"data:image/jpeg;base64," + base64.b64encode(raw))), expected)


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image = decode_image(jpeg((64, 48), exif=exif.tobytes()))
    assert image.size == (48, 64)


def truncated_png() -> bytes:
    data = (SKIMAGE / "chelsea.png").read_bytes()
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", r"empty payload \(0 bytes\)"),
        (b"hello, I am a text file\n", "not an image: Pillow cannot identify the format of these 24 bytes"),
        (truncated_png(), r"corrupt or truncated PNG data"),
        (jpeg()[: len(jpeg()) * 2 // 3], r"corrupt or truncated JPEG data"),
        (jpeg()[:300], r"not a readable image: OSError"),  # cut inside the header
        (b"\xff\xd8\xff\xe0" + b"\x00" * 50, "not a readable image|cannot identify"),
        (b"bm90IGFuIGltYWdl", "cannot identify the format"),  # base64 of text is still not an image
    ],
)
def test_bad_bytes_fail_with_a_message_naming_the_problem(data, message):
    with pytest.raises(InvalidImage, match=message):
        preprocess_bytes(data, CONFIGS[0])


def test_oversized_images_are_refused_before_decoding():
    with pytest.raises(InvalidImage, match=r"image is 64x48 = 3072 pixels, over the limit of 1000"):
        decode_image(jpeg(), max_pixels=1000)


# timm backbones: each family's own eval transform (timm.data.resolve_data_config of its
# smallest model), and the shapes timm's crop_pct meets (non-square, upscaling).
def _timm_configs() -> list[dict]:
    import timm
    from timm.data import resolve_data_config

    from headmaster.export.encoders import FAMILIES, Preprocessing

    found = {}
    for family in FAMILIES:
        if family.library == "timm":
            model = timm.create_model(family.smallest, pretrained=False, num_classes=0)
            cfg = Preprocessing.from_timm(resolve_data_config({}, model=model)).as_dict()
            found[f"{family.name}-{cfg['size'][0]}-crop{cfg.get('crop_pct', 1.0)}"] = cfg
    base = dict(next(iter(found.values())), crop_pct=0.875)
    found["non-square-192x256-crop0.875"] = dict(base, size=(192, 256))
    found["upscale-384-crop0.9-bilinear"] = dict(base, size=(384, 384), crop_pct=0.9, interpolation="bilinear")
    return list(found.items())


TIMM_CONFIGS = _timm_configs()


def timm_pixels(data: bytes, cfg: dict) -> torch.Tensor:
    """timm's own eval transform on an image its loader opened (RGB), before Normalize."""
    from timm.data import create_transform

    transform = create_transform(
        input_size=(3, *cfg["size"]),
        is_training=False,
        interpolation=cfg["interpolation"],
        mean=(0, 0, 0),
        std=(1, 1, 1),
        crop_pct=cfg.get("crop_pct", 1.0),
        crop_mode="center",
    )
    return transform(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.mark.parametrize("cfg", [c for _, c in TIMM_CONFIGS], ids=[n for n, _ in TIMM_CONFIGS])
@pytest.mark.parametrize("name", FILES)
def test_pixels_equal_timm_transform(name, cfg):
    data = (SKIMAGE / name).read_bytes()
    ours = preprocess_bytes(data, cfg)
    assert ours.shape == (3, *cfg["size"])
    assert torch.equal(torch.from_numpy(ours).float().div(255), timm_pixels(data, cfg))


def test_timm_crop_modes_other_than_center_are_refused():
    from headmaster.errors import ExportError
    from headmaster.export.encoders import Preprocessing

    cfg = {
        "input_size": (3, 224, 224),
        "interpolation": "bicubic",
        "mean": (0, 0, 0),
        "std": (1, 1, 1),
        "crop_pct": 0.9,
    }
    with pytest.raises(ExportError, match="crop_mode 'squash' is not served"):
        Preprocessing.from_timm({**cfg, "crop_mode": "squash"})
    with pytest.raises(ExportError, match="interpolation 'nearest' is not served"):
        Preprocessing.from_timm({**cfg, "interpolation": "nearest"})


def test_each_pooling_is_what_timm_itself_computes():
    """cls = the class token of forward_features; mean = the patch tokens' mean without the
    prefix (class + register) tokens, which is timm's own avg pool of DINOv3 (no fc_norm)."""
    import timm

    from headmaster.export.encoders import _pooled

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_dinov3", pretrained=False, num_classes=0, img_size=64).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert torch.allclose(_pooled(model, "cls")(x), tokens[:, 0])
        assert model.num_prefix_tokens == 5 and model.global_pool == "avg"
        assert torch.allclose(_pooled(model, "mean")(x), model(x), atol=1e-6)
        assert torch.allclose(_pooled(model, "head-less")(x), model(x))
