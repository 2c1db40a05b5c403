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
