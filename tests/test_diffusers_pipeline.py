"""The whole stack samples as diffusers' `UnCLIPPipeline` (Karlo's) on the same weights, exported
to diffusers' format (models.diffusers_export): an independent reference for the chain of samplers,
guidance and conditioning, prior -> decoder -> upsampler. In float64 on both sides, so that what
is compared is the algorithm, not float32 rounding.

What the pipeline cannot express is set on our side to what it does (models.diffusers_export says
why each one differs): one prior draw without L2 normalisation, the empty caption's encoding as
the null caption, and for the pipeline as shipped DDPM steps on UnCLIPScheduler's timesteps (it
has no DDIM and so no eta; its timesteps end at t = 0, ours are "trailing"). Our deterministic
path (DDIM, eta = 0, our timesteps) is compared with the pipeline's loop stepping with diffusers'
DDIMScheduler instead, behind the step signature the pipeline calls. The one thing it does that we do not, leaving the
bicubic-upsampled conditioning unclamped, is given our clamp through a forward pre-hook on its
super-res U-Nets; the test shows that the clamp acts.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import DDIMScheduler, PriorTransformer, UNet2DConditionModel, UNet2DModel, UnCLIPPipeline, UnCLIPScheduler
from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

from models import decoder as dec
from models import diffusion
from models import prior as prior_mod
from models import upsampler as ups
from models.diffusers_export import decoder_to_diffusers, export_unclip, prior_to_diffusers, upsampler_to_diffusers
from models.unclip import Stage, TextCondition, UnCLIP
from tests.model_helpers import perturb, random_clip_text

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D, L = 32, 8  # CLIP width and caption tokens, shared by the text encoder, the prior and the decoder
PRIOR = prior_mod.PriorConfig(embed_dim=D, text_dim=D, text_len=L, num_heads=2, head_dim=16, num_layers=2,
                              clip_sample=5.0, normalize=False)  # Karlo's prior: x0 clamped to +-5, z_i not normalised
DEC = dataclasses.replace(dec.SIZES["tiny"], image_size=16, attention_resolutions=[8], embed_dim=D, text_dim=D,
                          cross_attention_dim=32, learned_variance=True)  # Karlo's decoder: learned variance
UP = ups.SIZES["tiny"]  # 16 -> 32 px
STEPS = 4  # UnCLIPScheduler's timesteps 999, 666, 333, 0 (no rounding ties between its spacing and numpy's linspace)
PRIOR_GUIDANCE, DECODER_GUIDANCE = 4.0, 3.0


@pytest.fixture(scope="module")
def ours():
    tokenizer, text_model, encode = random_clip_text(D, L)
    text_model.double()
    torch.manual_seed(1)
    prior = perturb(prior_mod.DiffusionPrior(PRIOR), seed=1).eval()
    with torch.no_grad():  # predicted latents beyond +-5, so that the prior's clamp matters
        prior.transformer.proj_to_clip_embeddings.weight.mul_(40.0)
    decoder = perturb(dec.Decoder(DEC), seed=2).eval()
    upsampler = perturb(ups.Upsampler(UP), seed=3).eval()
    for model in (prior, decoder, upsampler):
        model.double()
    stack = UnCLIP(decoder, prior, [upsampler], text_encoder=encode)
    stack.use_empty_caption_as_null()  # the pipeline's unconditional branch: the encoding of ""
    return stack, tokenizer, text_model


def clamp_conditioning(module, args, kwargs):
    """Our upsampler's conditioning (models.upsampler.upsample_to) is clamped to [-1, 1]."""
    sample = kwargs["sample"]
    c = sample.shape[1] // 2
    return args, {**kwargs, "sample": torch.cat([sample[:, :c], sample[:, c:].clamp(-1, 1)], 1)}


@pytest.fixture(scope="module")
def pipeline(ours, tmp_path_factory):
    """UnCLIPPipeline on our weights, exported and loaded back from disk, in float64."""
    stack, tokenizer, text_model = ours
    path = export_unclip(tmp_path_factory.mktemp("unclip"), stack.prior, stack.decoder, stack.upsamplers[0])
    components = dict(
        prior=PriorTransformer.from_pretrained(path / "prior"),
        decoder=UNet2DConditionModel.from_pretrained(path / "decoder"),
        text_proj=UnCLIPTextProjModel.from_pretrained(path / "text_proj"),
        super_res_first=UNet2DModel.from_pretrained(path / "super_res_first"),
        super_res_last=UNet2DModel.from_pretrained(path / "super_res_last"),
        **{name: UnCLIPScheduler.from_pretrained(path / name) for name in SCHEDULERS},
    )
    for name in ("prior", "decoder", "text_proj", "super_res_first", "super_res_last"):
        components[name].double()
    for name in SCHEDULERS:
        # UnCLIPScheduler's last step (t = 0) scales x0 by beta_0 / (1 - abar_0), which is 1 but
        # comes out 0.99947 from its float32 cumprod; it also forms a step's alpha as 1 - beta,
        # which keeps no float32 digits at t = 999. Its tables in float64 make it the exact reference.
        scheduler = components[name]
        scheduler.betas = scheduler.betas.double()
        scheduler.alphas = 1.0 - scheduler.betas
        scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, 0)
        scheduler.one = scheduler.one.double()
    pipe = UnCLIPPipeline(text_encoder=text_model, tokenizer=tokenizer, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


SCHEDULERS = ("prior_scheduler", "decoder_scheduler", "super_res_scheduler")


def run_pipeline(pipe, captions: TextCondition, steps: int, clamp: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (B, H, W, C) in [0, 1], the prior's z_i as the decoder's text_proj received it);
    clamp: our clamp of the upsampler's conditioning (the pipeline has none)."""
    seen = {}

    def keep_image_emb(module, args, kwargs):
        seen["z"] = kwargs["image_embeddings"]

    hooks = [pipe.text_proj.register_forward_pre_hook(keep_image_emb, with_kwargs=True)]
    if clamp:
        hooks += [net.register_forward_pre_hook(clamp_conditioning, with_kwargs=True) for net in (pipe.super_res_first, pipe.super_res_last)]
    try:
        out = pipe(text_model_output=(captions.emb, captions.states), text_attention_mask=captions.mask,
                   prior_num_inference_steps=steps, decoder_num_inference_steps=steps, super_res_num_inference_steps=steps,
                   prior_guidance_scale=PRIOR_GUIDANCE, decoder_guidance_scale=DECODER_GUIDANCE,
                   generator=torch.Generator().manual_seed(0), output_type="np").images
    finally:
        for hook in hooks:
            hook.remove()
    return torch.from_numpy(out), seen["z"]


def run_ours(stack: UnCLIP, captions: TextCondition, steps: int, sampler: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Our stack with the pipeline's settings: one prior draw, eta = 0, the same seed; images as
    the pipeline's "np" output."""
    image, z_i = stack.sample(
        captions, generator=torch.Generator().manual_seed(0), return_image_emb=True,
        prior=dict(steps=steps, sampler=sampler, guidance_scale=PRIOR_GUIDANCE, candidates=1),
        decoder=Stage(steps=steps, sampler=sampler, guidance_scale=DECODER_GUIDANCE),
        upsamplers=[Stage(steps=steps, sampler=sampler)])
    return (image * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float(), z_i


def captions_of(stack: UnCLIP) -> TextCondition:
    captions = stack.encode_text(["red", "a blue"])  # one token per letter: 5 and 8 of L = 8
    assert not captions.mask.all()  # padded captions: the masks matter
    return captions


def test_full_stack_samples_as_diffusers_unclip_pipeline(ours, pipeline, monkeypatch):
    """DDPM, the pipeline as shipped (UnCLIPScheduler): ours visits its timesteps."""
    stack = ours[0]
    monkeypatch.setattr(diffusion, "TIMESTEP_SPACING", "linspace")  # the pipeline cannot take ours ("trailing")
    pipeline.decoder_scheduler.set_timesteps(STEPS)
    assert diffusion.sampling_timesteps(stack.decoder.scheduler("ddpm"), STEPS) == pipeline.decoder_scheduler.timesteps.tolist() == [999, 666, 333, 0]
    captions = captions_of(stack)

    expected, expected_z = run_pipeline(pipeline, captions, STEPS)
    got, z_i = run_ours(stack, captions, STEPS, "ddpm")
    assert got.shape == expected.shape == (2, UP.image_size, UP.image_size, 3)
    # the prior's z_i, then the image after all three stages; what is left is our schedulers'
    # float32 alpha-bars (2e-4 is 1/20 of a grey level)
    torch.testing.assert_close(z_i, expected_z, rtol=1e-5, atol=1e-5)
    assert (z_i.norm(dim=-1) - 1).abs().min() > 0.1  # not normalised, as in the pipeline
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-4)
    unclamped, _ = run_pipeline(pipeline, captions, STEPS, clamp=False)
    assert (got - unclamped).abs().max() > 1e-2  # the conditioning clamp acted: without it they differ


class PipelineDDIM(DDIMScheduler):
    """diffusers' DDIMScheduler (eta = 0) behind UnCLIPScheduler's step signature, which the
    pipeline calls: the timesteps come from its own set_timesteps, so prev_timestep is dropped;
    a learned variance (the decoder's second half of channels) has no use in DDIM."""

    def step(self, model_output, timestep, sample, prev_timestep=None, generator=None, return_dict=True):
        return super().step(model_output[:, : sample.shape[1]], timestep, sample, eta=0.0, generator=generator)


def test_full_stack_ddim_eta0_as_the_pipeline_with_diffusers_ddim(ours, pipeline, monkeypatch):
    """Our deterministic path (DDIM, eta = 0, our "trailing" timesteps) against the pipeline's loop
    stepping with diffusers' DDIMScheduler configured as ours. The step count divides T: for
    other counts diffusers' DDIMScheduler.step pairs the timesteps wrongly (models.diffusion)."""
    stack = ours[0]
    steps = 4  # timesteps 999, 749, 499, 249, then abar = 1
    for name, scheduler in (("prior_scheduler", stack.prior.scheduler("ddim")), ("decoder_scheduler", stack.decoder.scheduler("ddim")),
                            ("super_res_scheduler", stack.upsamplers[0].scheduler("ddim"))):
        monkeypatch.setattr(pipeline, name, PipelineDDIM.from_config(scheduler.config))
    pipeline.prior_scheduler.set_timesteps(steps)
    assert pipeline.prior_scheduler.timesteps.tolist() == diffusion.sampling_timesteps(stack.prior.scheduler("ddim"), steps)
    assert pipeline.prior_scheduler.config.clip_sample_range == 5.0
    captions = captions_of(stack)

    expected, expected_z = run_pipeline(pipeline, captions, steps)
    got, z_i = run_ours(stack, captions, steps, "ddim")
    torch.testing.assert_close(z_i, expected_z, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (got - run_ours(stack, captions, steps, "ddpm")[0]).abs().max() > 1e-2  # DDIM reached every stage


def test_export_refuses_what_diffusers_cannot_hold():
    with pytest.raises(ValueError, match="text_dim"):
        prior_to_diffusers(prior_mod.DiffusionPrior(dataclasses.replace(PRIOR, text_dim=16)))
    with pytest.raises(ValueError, match="v_prediction"):
        decoder_to_diffusers(dec.Decoder(dataclasses.replace(DEC, prediction_type="v_prediction")))
    with pytest.raises(ValueError, match="patch_size"):
        decoder_to_diffusers(dec.Decoder(dataclasses.replace(DEC, patch_size=2)))
    with pytest.raises(ValueError, match="noise_aug_max"):
        upsampler_to_diffusers(ups.Upsampler(dataclasses.replace(UP, noise_aug_max=0.2)))
    with pytest.raises(ValueError, match="cosine"):
        upsampler_to_diffusers(ups.Upsampler(dataclasses.replace(UP, schedule="linear")))
