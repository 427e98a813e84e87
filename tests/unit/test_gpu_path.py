"""The GPU path as far as a machine without a GPU can check it (issue 12).

What runs here: the configs a GPU repository gets (instance kinds, batching, DLPack inputs),
validated through Triton's model_config protobuf; the torchvision decoder (the code nvJPEG runs
on a GPU, here on CPU tensors) against the Pillow path on real photos; the encoder runner's
DLPack / I/O-binding branch with torch tensors on CPU. What does not: CUDA itself (no GPU).
"""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
import skimage.data
import torch
from onnx import TensorProto, helper, numpy_helper, save
from PIL import Image

from headmaster.errors import ConfigError
from headmaster.repository import topology
from headmaster.repository.config import Instances, PreprocessModel, parse, render
from headmaster.repository.repo import GPU_DEFAULTS, BuildOptions
from headmaster.served.preprocess import InvalidImage, TorchDecoder, limits_from_parameters, preprocess_bytes
from headmaster.served.runtime import _concatenate, load_runner

CLIP = {"size": [224, 224], "resize_mode": "shortest", "interpolation": "bicubic"}


def card():
    """The parts of an encoder card the topology reads."""
    tower = SimpleNamespace(
        format="onnx",
        input_name="PIXELS",
        input_dtype="UINT8",
        input_dims=[3, 224, 224],
        output_name="EMBEDDING",
        graph_optimization="all",
    )
    return SimpleNamespace(
        preprocessing={**CLIP, "mean": [0.5] * 3, "std": [0.5] * 3},
        model="ViT-B-32",
        context_length=77,
        fingerprint="f" * 64,
        embed_dim=512,
        towers={"image": tower},
    )


def jpeg(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, **options)
    return buffer.getvalue()


# -- build options and configs -------------------------------------------------------------------
def test_cuda_picks_gpu_batching_defaults_and_what_is_given_wins():
    gpu = BuildOptions.for_device("cuda")
    assert (gpu.max_batch_size, gpu.preferred_batch_sizes, gpu.encoder_instances, gpu.decoder) == (
        GPU_DEFAULTS["max_batch_size"],
        GPU_DEFAULTS["preferred_batch_sizes"],
        2,
        "torchvision",
    )
    given = BuildOptions.for_device(
        "cuda", max_batch_size=128, preferred_batch_sizes=(32, 64), decoder="pillow", encoder_instances=None
    )
    assert (given.max_batch_size, given.preferred_batch_sizes, given.decoder, given.encoder_instances) == (
        128,
        (32, 64),
        "pillow",
        2,
    )
    assert BuildOptions.for_device("cpu") == BuildOptions(device="cpu")
    with pytest.raises(ConfigError, match="preferred_batch_sizes"):
        BuildOptions.for_device("cuda", max_batch_size=64)  # the GPU's preferred sizes no longer fit: said
    with pytest.raises(ConfigError, match="decoder must be pillow or torchvision"):
        BuildOptions(decoder="nvjpeg")


def configs(options: BuildOptions) -> dict:
    models = [m for m in topology.static_models(card(), options) if m.name in ("preprocess", "image_encoder")]
    return {m.name: parse(render(m, options.flavour)) for m in models}


@pytest.mark.parametrize("flavour", ["portable", "native"])
def test_a_gpu_repository_places_decode_and_encoder_on_every_gpu(flavour):
    parsed = configs(BuildOptions.for_device("cuda", flavour=flavour))
    kind_gpu = parse("instance_group {kind: KIND_GPU}").instance_group[0].kind
    encoder, preprocess = parsed["image_encoder"], parsed["preprocess"]
    assert encoder.instance_group[0].kind == kind_gpu and encoder.instance_group[0].count == 2
    assert (
        preprocess.instance_group[0].kind == kind_gpu and preprocess.parameters["decoder"].string_value == "torchvision"
    )
    assert list(encoder.dynamic_batching.preferred_batch_size) == [64, 128, 256, 512]
    assert encoder.max_batch_size == 512
    if flavour == "portable":  # GPU tensors from preprocess reach the python encoder as they are (DLPack)
        assert encoder.parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value == "no"
        assert encoder.parameters["device"].string_value == "cuda"


def test_a_cpu_repository_keeps_everything_on_cpu():
    parsed = configs(BuildOptions(device="cpu"))
    kind_cpu = parse("instance_group {kind: KIND_CPU}").instance_group[0].kind
    assert all(m.instance_group[0].kind == kind_cpu for m in parsed.values())
    assert "decoder" not in parsed["preprocess"].parameters
    assert "FORCE_CPU_ONLY_INPUT_TENSORS" not in parsed["image_encoder"].parameters


def test_pillow_cannot_decode_on_a_gpu():
    with pytest.raises(ConfigError, match="only with decoder torchvision"):
        PreprocessModel(CLIP, instances=Instances(1, gpu=True))


# -- the torchvision decoder ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def decoder():
    cfg = {**CLIP, **limits_from_parameters({})}
    return TorchDecoder(cfg, "cpu"), lambda data: _pillow(data, cfg)


def _pillow(data, cfg):
    try:
        return preprocess_bytes(data, {**cfg, "exact_decode": True})
    except InvalidImage as e:
        return e


def photos() -> dict[str, bytes]:
    exif = Image.Exif()
    exif[0x0112] = 6
    out = {name: jpeg(Image.fromarray(getattr(skimage.data, name)())) for name in ("astronaut", "chelsea", "coffee")}
    out["grey"] = jpeg(Image.fromarray(skimage.data.camera()))
    out["large"] = jpeg(Image.fromarray(skimage.data.coffee()).resize((2400, 1600), Image.LANCZOS))
    out["rotated"] = jpeg(Image.fromarray(skimage.data.chelsea()), exif=exif.tobytes())
    return out


def test_torchvision_decoding_is_within_a_few_levels_of_pillows_exact_pixels(decoder):
    torch_decoder, pillow = decoder
    images = photos()
    decoded = torch_decoder(list(images.values()), pillow)
    for (name, data), pixels in zip(images.items(), decoded):
        exact = pillow(data)
        assert isinstance(pixels, torch.Tensor) and pixels.dtype == torch.uint8 and pixels.shape == (3, 224, 224)
        difference = np.abs(pixels.numpy().astype(int) - exact.astype(int))
        # torch's antialiased bicubic is not Pillow's: measured max 5, mean under 0.2 on these photos.
        assert difference.max() <= 6 and difference.mean() < 0.25, name


def test_what_the_torchvision_path_does_not_take_goes_through_pillow(decoder):
    torch_decoder, pillow = decoder
    png = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(png, "PNG")
    cmyk = jpeg(Image.fromarray(skimage.data.chelsea()).convert("CMYK"))
    tiny = jpeg(Image.fromarray(skimage.data.chelsea()).resize((100, 80)))  # smaller than the crop: padded
    good = jpeg(Image.fromarray(skimage.data.coffee()))
    truncated = good[: len(good) // 2]
    items = [png.getvalue(), cmyk, tiny, truncated, b"", good]
    results = torch_decoder(items, pillow)
    for data, result in zip(items[:3], results[:3]):
        assert np.array_equal(result.numpy(), pillow(data))  # exactly Pillow's pixels
    assert isinstance(results[3], InvalidImage) and "corrupt or truncated JPEG" in str(results[3])
    assert isinstance(results[4], InvalidImage) and "empty payload" in str(results[4])
    assert isinstance(results[5], torch.Tensor)  # a bad neighbour does not spoil the batch


# -- the encoder runner with torch tensors (DLPack) ----------------------------------------------
def test_the_onnx_runner_binds_torch_tensors_and_answers_as_with_numpy(tmp_path):
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(3 * 8 * 8, 4)).astype(np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["PIXELS"], ["x"], to=TensorProto.FLOAT),
            helper.make_node("Flatten", ["x"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "w"], ["EMBEDDING"]),
        ],
        "image",
        [helper.make_tensor_value_info("PIXELS", TensorProto.UINT8, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("EMBEDDING", TensorProto.FLOAT, ["batch", 4])],
        [w],
    )
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "model.onnx")
    runner = load_runner(str(tmp_path / "model.onnx"), device="cpu")
    pixels = np.random.default_rng(1).integers(0, 256, (5, 3, 8, 8), dtype=np.uint8)
    (expected,) = runner({"PIXELS": pixels}, ["EMBEDDING"])
    # What execute() builds from requests whose tensors came by DLPack: torch, in parts.
    batch = _concatenate([torch.from_numpy(pixels[:2]), pixels[2:]])
    (bound,) = runner({"PIXELS": batch}, ["EMBEDDING"])
    assert isinstance(batch, torch.Tensor) and np.array_equal(bound, expected)
    with pytest.raises(RuntimeError, match="device=cuda:1 asked, but onnxruntime offers only"):
        load_runner(str(tmp_path / "model.onnx"), device="cuda:1")
