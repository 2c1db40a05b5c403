"""Caption conditioning for the training stages: the frozen CLIP that embedded the table computes
caption token states on the worker's device, batched, instead of storing them (L × width floats
per row would dwarf the table)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tasks.schema import CLIP_DIR, CLIP_SPEC_NAME, load_embedding_clip


def clip_dims(embed_dir: str | Path) -> dict[str, int]:
    """embed_dim, text_width and context_length of the table's CLIP, without loading weights."""
    from models.clip import load_clip

    spec_path = Path(embed_dir) / CLIP_DIR / CLIP_SPEC_NAME
    if not spec_path.is_file():
        raise FileNotFoundError(f"{spec_path} is missing: {embed_dir} is not an embed stage output")
    spec = json.loads(spec_path.read_text())
    with torch.device("meta"):
        encoder = load_clip(spec.get("model"), None, arch=spec.get("arch"), device="meta",
                            context_length=spec.get("context_length"))
    return {"embed_dim": encoder.embed_dim, "text_width": encoder.text_width, "context_length": encoder.context_length}


class CaptionEncoder:
    """tokens (B, L) → (text_states (B, L', width), text_mask (B, L') True = real token), where L'
    ends at the batch's last end token: the causal text tower's later positions are padding."""

    def __init__(self, embed_dir: str | Path, device):
        self.clip = load_embedding_clip(embed_dir, device=str(device)).eval()
        for p in self.clip.parameters():
            p.requires_grad_(False)
        self.device = device

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = tokens.long().to(self.device)
        mask = tokens != 0
        length = int(mask.sum(1).max())
        tokens, mask = tokens[:, :length], mask[:, :length]
        _, states = self.clip.encode_text_with_hidden(tokens)
        return states, mask
