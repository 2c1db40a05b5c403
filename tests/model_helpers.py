"""Small helpers shared by the model tests."""

import torch


def perturb(model, scale=0.05, seed=1):
    """Random non-zero values everywhere (diffusers zero-inits output convs and our nulls), so a
    test sees every parameter's effect."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def random_clip_text(width: int, text_len: int, seed: int = 0):
    """A random-init transformers CLIP text model (one layer, projection to `width`) and a
    letters-only BPE tokenizer that pads to `text_len` (no files, no downloads): what diffusers'
    UnCLIPPipeline needs to encode its unconditional "" (tests, benchmarks/sample.py).
    Returns (tokenizer, model, encode) with encode(captions) -> models.unclip.TextCondition, the
    unnormalised projection as Karlo's."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    from models.unclip import TextCondition

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{c + "</w>": 2 + i for i, c in enumerate(letters)},
             **{c: 28 + i for i, c in enumerate(letters)}}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=text_len)
    torch.manual_seed(seed)
    model = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=text_len, projection_dim=width, bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()

    def encode(captions) -> TextCondition:
        tokens = tokenizer(list(captions), padding="max_length", max_length=text_len, truncation=True, return_tensors="pt")
        with torch.no_grad():
            out = model(tokens.input_ids.to(model.device))
        return TextCondition(out.text_embeds, out.last_hidden_state, tokens.attention_mask.bool().to(model.device))

    return tokenizer, model, encode
