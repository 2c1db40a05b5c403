"""models.clip: loading paths, embeddings, per-token states, tokenizer, preprocessing split."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from models.clip import TINY_CLIP_ARCH, ClipError, ClipWeightsUnavailable, load_clip, save_clip_weights


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return load_clip(arch=TINY_CLIP_ARCH)


def _image(seed: int, size=(48, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8))


def test_tiny_properties(clip):
    assert clip.embed_dim == 64 and clip.context_length == 32 and clip.image_size == 32 and clip.text_width == 64


def test_embeddings_unit_norm_and_match_open_clip(clip):
    images = torch.stack([clip.preprocess(_image(i)) for i in range(3)])
    z_i = clip.encode_image(images)
    assert torch.allclose(z_i.norm(dim=-1), torch.ones(3), atol=1e-5)
    ref = clip.model.encode_image(images, normalize=True)
    assert torch.allclose(z_i, ref, atol=1e-6)
    tokens = clip.tokenize(["a red circle", "a small blue square left of a green star"])
    z_t = clip.encode_text(tokens)
    assert torch.allclose(z_t, clip.model.encode_text(tokens, normalize=True), atol=1e-6)


def test_text_embedding_runs_only_to_the_last_end_token(clip):
    """Cutting the padding after the batch's last end token gives open_clip's numbers, also when
    one caption fills the whole context."""
    long = " ".join(["red circle"] * 40)  # longer than the tiny context: truncated, end token last
    for captions, cut in ((["a red circle", "two small yellow triangles"], True), (["a red circle", long], False)):
        tokens = clip.tokenize(captions)
        positions = int((tokens != 0).sum(dim=1).max())  # start, words, end; padding is 0
        assert (positions < clip.context_length) == cut
        seen = []
        handle = clip.model.transformer.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
        try:
            z_t = clip.encode_text(tokens)
        finally:
            handle.remove()
        assert seen == [positions]
        torch.testing.assert_close(z_t, clip.model.encode_text(tokens, normalize=True), atol=1e-6, rtol=0)


def test_hidden_states_are_ln_final_output(clip):
    tokens = clip.tokenize(["a red circle", "two yellow triangles"])
    captured = {}
    handle = clip.model.ln_final.register_forward_hook(lambda m, i, o: captured.setdefault("out", o))
    try:
        reference = clip.model.encode_text(tokens, normalize=True)
    finally:
        handle.remove()
    z_t, hidden = clip.encode_text_with_hidden(tokens)
    assert hidden.shape == (2, clip.context_length, clip.text_width)
    torch.testing.assert_close(hidden, captured["out"].float())
    torch.testing.assert_close(z_t, reference)
    # the embedding is the end-token state projected: hidden states carry what encode_text pools
    eot = tokens.argmax(dim=-1)
    pooled = hidden[torch.arange(2), eot] @ clip.model.text_projection
    torch.testing.assert_close(torch.nn.functional.normalize(pooled, dim=-1), z_t)
    # unnormalised (Karlo's convention): the projection itself, with the same hidden states
    raw, hidden_raw = clip.encode_text_with_hidden(tokens, normalize=False)
    torch.testing.assert_close(raw, pooled)
    torch.testing.assert_close(raw, clip.model.encode_text(tokens, normalize=False))
    assert torch.equal(hidden_raw, hidden)


def test_tokens_decode_to_caption(clip):
    caption = "a small red circle left of a blue square"
    tokens = clip.tokenize(caption)
    assert tokens.shape == (1, 32)
    assert clip.decode_tokens(tokens[0]) == caption


def test_preprocess_split_equals_open_clip_transform(clip):
    image = _image(7, size=(50, 37))
    ref = open_clip.image_transform(32, is_train=False)(image)
    arr = clip.preprocess_uint8(image)
    assert arr.shape == (32, 32, 3) and arr.dtype == np.uint8
    torch.testing.assert_close(clip.normalize(arr[None])[0], ref, atol=1e-6, rtol=0)


def test_local_safetensors_checkpoint_round_trip(clip, tmp_path):
    path = save_clip_weights(clip, tmp_path / "tiny.safetensors")
    torch.manual_seed(123)  # a different random init, overwritten by the file
    loaded = load_clip(arch=TINY_CLIP_ARCH, pretrained=str(path))
    tokens = clip.tokenize(["a green star"])
    torch.testing.assert_close(loaded.encode_text(tokens), clip.encode_text(tokens))
    # an arch given as a JSON file works the same
    import json

    arch_file = tmp_path / "arch.json"
    arch_file.write_text(json.dumps(TINY_CLIP_ARCH))
    again = load_clip(arch=arch_file, pretrained=str(path))
    torch.testing.assert_close(again.encode_text(tokens), clip.encode_text(tokens))


def test_resnet_image_tower_carries_its_batchnorm_statistics_to_the_encoder(tmp_path):
    """A CLIP with a ResNet image tower (open_clip's ModifiedResNet, as RN50's): the BatchNorm running
    statistics learnt in training reach the exported encoder, which uses them (eval mode)."""
    from models.clip import ClipConfig, ClipModel

    arch = {**TINY_CLIP_ARCH, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16, "head_width": 16}}
    torch.manual_seed(0)
    model = ClipModel(ClipConfig(arch)).train()
    images = torch.rand(16, 3, 32, 32) * 0.5 + 0.5  # bright images: the statistics move from their init
    tokens = open_clip.SimpleTokenizer(context_length=32)(["a red circle"] * 16)
    with torch.no_grad():
        for _ in range(5):
            model(images, tokens)
    path = save_clip_weights(model.encoder(), tmp_path / "resnet.safetensors")
    loaded = load_clip(arch=arch, pretrained=str(path))
    x = loaded.normalize((images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy())
    z = loaded.encode_image(x)
    torch.testing.assert_close(z, model.eval().encoder().encode_image(x))
    fresh_statistics = load_clip(arch=arch, pretrained=str(path))
    for module in fresh_statistics.model.visual.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
    assert (fresh_statistics.encode_image(x) - z).abs().max() > 1e-2


def test_mismatched_weights_file_is_a_clear_error(clip, tmp_path):
    path = save_clip_weights(clip, tmp_path / "tiny.safetensors")
    other = {**TINY_CLIP_ARCH, "embed_dim": 32}
    with pytest.raises(ClipError, match="do not match"):
        load_clip(arch=other, pretrained=str(path))


def test_missing_pretrained_weights_offline_says_how_to_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    with pytest.raises(ClipWeightsUnavailable, match=r"safetensors file.*pretrained"):
        load_clip("ViT-B-32", pretrained="openai")


def test_bad_inputs_name_the_problem(tmp_path):
    with pytest.raises(ClipError, match="unknown open_clip model 'ViT-Q-99'"):
        load_clip("ViT-Q-99", pretrained=None)
    with pytest.raises(ClipError, match="neither a known tag"):
        load_clip("ViT-B-32", pretrained=str(tmp_path / "nope.safetensors"))
    pickled = tmp_path / "weights.pt"
    pickled.write_bytes(b"not really")
    with pytest.raises(ClipError, match="pickled"):
        load_clip(arch=TINY_CLIP_ARCH, pretrained=str(pickled))
    with pytest.raises(ClipError, match="lacks"):
        load_clip(arch={"embed_dim": 8})


def test_describe_without_weights_matches_the_built_model(clip):
    from models.clip import describe_clip

    info = describe_clip(arch=TINY_CLIP_ARCH)
    assert info["embed_dim"] == clip.embed_dim and info["context_length"] == clip.context_length
    assert info["preprocess_cfg"] == clip.preprocess_cfg
    big = describe_clip("ViT-B-32", "laion2b_s34b_b79k")  # no download, no allocation
    assert big["embed_dim"] == 512 and big["context_length"] == 77 and list(big["preprocess_cfg"]["size"]) == [224, 224]
    with pytest.raises(ClipError, match="OpenAI BPE tokenizer"):
        describe_clip("ViT-B-16-SigLIP", "webli")  # its tokenizer is not the one the stage writes


@pytest.mark.parametrize("size", [(50, 37), (37, 50), (32, 32), (20, 31), (224, 160), (33, 1000)])
def test_torch_free_preprocessor_equals_open_clip(size):
    from models.clip_preprocess import ImagePreprocessor

    image = _image(sum(size), size=size)
    ref = open_clip.image_transform(32, is_train=False)
    ours = ImagePreprocessor({"size": (32, 32), "mean": open_clip.OPENAI_DATASET_MEAN, "std": open_clip.OPENAI_DATASET_STD,
                              "interpolation": "bicubic", "resize_mode": "shortest"})
    steps = [t for t in ref.transforms if "ToTensor" not in type(t).__name__ and "Normalize" not in type(t).__name__]
    expected = image
    for step in steps:
        expected = step(expected)
    np.testing.assert_array_equal(ours(image), np.asarray(expected.convert("RGB")))


def test_a_process_that_loads_clip_and_is_killed_leaves_nothing_in_tmp(tmp_path):
    """A Ray worker that loaded CLIP is stopped, not exited: whatever its imports made in the
    temporary directory stays there (wandb, imported by timm, made two folders per process)."""
    code = ("import os, models.clip, sys; assert 'timm' in sys.modules; "
            "print('wandb' in sys.modules, flush=True); os._exit(0)")
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
    assert sorted(os.listdir(tmp_path)) == []
    # and wandb, installed with img2dataset, still imports afterwards in a process that wants it
    later = subprocess.run([sys.executable, "-c", "import models.clip, wandb; print(wandb.__name__)"],
                           env=env, capture_output=True, text=True, timeout=120)
    assert later.stdout.strip() == "wandb", later.stderr
