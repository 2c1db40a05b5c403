"""Pure PyTorch unCLIP models: priors, decoder, upsamplers, diffusion sampling, manipulations.

Nothing here knows about Ray, MLflow or storage layouts; checkpoints are safetensors + JSON.
"""
