"""Our prior, decoder and upsampler as the components of diffusers' `UnCLIPPipeline` (Karlo's layout).

The networks already are diffusers modules (`PriorTransformer`, `UNet2DConditionModel`,
`UNet2DModel`) and `TextProj` has `UnCLIPTextProjModel`'s parameter names, so exporting is copying
weights into fresh diffusers modules (plain diffusers blocks, not our fast paths) plus the
`UnCLIPScheduler` each stage's config implies. `export_unclip` writes them with `save_pretrained`
under the pipeline's sub-folder names; the text encoder and tokenizer (transformers' CLIP) are not
ours and are not written. The pipeline itself needs transformers, which is only a test extra here.

Refused (ValueError), because diffusers' modules cannot hold them: caption states of another width
than the CLIP embedding (our prior's `text_in`, a decoder `text_dim != embed_dim`), v-prediction,
a linear noise schedule (UnCLIPScheduler is cosine only), an upsampler's noise-conditioning
augmentation (the pipeline passes no noise level).

Exported, but sampled differently by the pipeline (what `UnCLIP.sample` must be told to match it):
- timesteps: UnCLIPScheduler visits round(i (T-1) / (n-1)), ending at t = 0; ours are "trailing"
  (models.diffusion.TIMESTEP_SPACING); the pipeline's step is DDPM's (no DDIM, no eta): use
  sampler="ddpm" on both sides and the same timesteps;
- the prior: one draw per caption (ours: best of `candidates`), no L2 normalisation of z_i
  (ours: PriorConfig.normalize);
- the null caption: the pipeline encodes "" with its text encoder; ours is learned unless
  `UnCLIP.use_empty_caption_as_null` (set_null_condition) made it that encoding;
- the decoder's guidance: the pipeline splits a variance off the decoder's output whenever it
  guides, so it can guide only a learned-variance decoder (DecoderConfig.learned_variance);
- the upsampler's conditioning: the pipeline does not clamp the bicubic-upsampled image to [-1, 1]
  (ours does, models.upsampler.upsample_to), and runs `super_res_last` for the last step (ours:
  one network, exported as both).
"""

from __future__ import annotations

from pathlib import Path

from diffusers import PriorTransformer, UNet2DConditionModel, UNet2DModel, UnCLIPScheduler

from .decoder import Decoder, unet_kwargs as decoder_unet_kwargs
from .prior import DiffusionPrior
from .upsampler import Upsampler, unet_kwargs as upsampler_unet_kwargs

UNCLIP_PREDICTIONS = ("epsilon", "sample")  # what UnCLIPScheduler.step takes


def _scheduler(where: str, *, schedule: str, prediction_type: str, num_train_timesteps: int,
               clip_sample: float | None, variance_type: str) -> UnCLIPScheduler:
    if schedule != "cosine":
        raise ValueError(f"{where}.schedule={schedule!r}: diffusers' UnCLIPScheduler has only the cosine schedule")
    if prediction_type not in UNCLIP_PREDICTIONS:
        raise ValueError(f"{where}.prediction_type={prediction_type!r}: UnCLIPScheduler takes {UNCLIP_PREDICTIONS}")
    return UnCLIPScheduler(num_train_timesteps=num_train_timesteps, variance_type=variance_type,
                           prediction_type=prediction_type, clip_sample=clip_sample is not None,
                           clip_sample_range=float(clip_sample) if clip_sample is not None else 1.0)


def prior_to_diffusers(prior: DiffusionPrior) -> tuple[PriorTransformer, UnCLIPScheduler]:
    """(prior, prior_scheduler): the PriorTransformer with our weights (clip_mean/clip_std included:
    the pipeline's post_process_latents is our from_latent) and DDPM's fixed small variance."""
    c = prior.config
    if prior.text_in is not None:
        raise ValueError(f"PriorConfig.text_dim={c.text_dim} != embed_dim={c.embed_dim}: diffusers' PriorTransformer "
                         "takes caption states of the embedding's width (our text_in projection has no place there)")
    transformer = PriorTransformer.from_config(prior.transformer.config)
    transformer.load_state_dict(prior.transformer.state_dict())
    scheduler = _scheduler("PriorConfig", schedule=c.schedule, prediction_type="sample", num_train_timesteps=c.num_train_timesteps,
                           clip_sample=c.clip_sample, variance_type="fixed_small_log")
    return transformer.eval(), scheduler


def decoder_to_diffusers(decoder: Decoder, clip_sample: float | None = 1.0):
    """(decoder, text_proj, decoder_scheduler): UNet2DConditionModel and UnCLIPTextProjModel with
    our weights; the learned null image embedding travels in text_proj, the null caption does not
    (the pipeline encodes ""). clip_sample: the x0 clamp we sample with (Decoder.sample's default)."""
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel  # no transformers needed

    c = decoder.config
    if c.patch_size != 1:
        raise ValueError(f"DecoderConfig.patch_size={c.patch_size}: UnCLIPPipeline's decoder U-Net works on pixels "
                         "(patch_size 1)")
    if c.text_dim != c.embed_dim:
        raise ValueError(f"DecoderConfig.text_dim={c.text_dim} != embed_dim={c.embed_dim}: diffusers' "
                         "UnCLIPTextProjModel projects caption states of the embedding's width")
    unet = UNet2DConditionModel(**decoder_unet_kwargs(c))
    unet.load_state_dict(decoder.unet.state_dict())
    text_proj = UnCLIPTextProjModel(clip_extra_context_tokens=c.clip_extra_context_tokens, clip_embeddings_dim=c.embed_dim,
                                    time_embed_dim=c.time_embed_dim, cross_attention_dim=c.cross_attention_dim)
    text_proj.load_state_dict(decoder.text_proj.state_dict())
    scheduler = _scheduler("DecoderConfig", schedule=c.schedule, prediction_type=c.prediction_type,
                           num_train_timesteps=c.num_train_timesteps, clip_sample=clip_sample,
                           variance_type="learned_range" if c.learned_variance else "fixed_small_log")
    return unet.eval(), text_proj.eval(), scheduler


def upsampler_to_diffusers(upsampler: Upsampler) -> tuple[UNet2DModel, UnCLIPScheduler]:
    """(super_res UNet2DModel, super_res_scheduler); the pipeline's super_res_first and
    super_res_last are both this one network."""
    c = upsampler.config
    if c.noise_aug_max > 0:
        raise ValueError(f"UpsamplerConfig.noise_aug_max={c.noise_aug_max}: UnCLIPPipeline passes no conditioning noise "
                         "level to the super-res U-Net; export an upsampler trained without noise-conditioning augmentation")
    unet = UNet2DModel(**upsampler_unet_kwargs(c))
    unet.load_state_dict(upsampler.unet.state_dict())
    scheduler = _scheduler("UpsamplerConfig", schedule=c.schedule, prediction_type=c.prediction_type,
                           num_train_timesteps=c.num_train_timesteps, clip_sample=1.0, variance_type="fixed_small_log")
    return unet.eval(), scheduler


def unclip_components(prior: DiffusionPrior, decoder: Decoder, upsampler: Upsampler) -> dict:
    """UnCLIPPipeline's keyword arguments except text_encoder and tokenizer."""
    prior_net, prior_scheduler = prior_to_diffusers(prior)
    unet, text_proj, decoder_scheduler = decoder_to_diffusers(decoder)
    super_res, super_res_scheduler = upsampler_to_diffusers(upsampler)
    if prior.config.embed_dim != decoder.config.embed_dim:
        raise ValueError(f"prior embed_dim={prior.config.embed_dim} != decoder embed_dim={decoder.config.embed_dim}")
    if upsampler.config.low_res_size != decoder.config.image_size:
        raise ValueError(f"upsampler low_res_size={upsampler.config.low_res_size} != decoder image_size={decoder.config.image_size}")
    return dict(prior=prior_net, prior_scheduler=prior_scheduler, decoder=unet, text_proj=text_proj,
                decoder_scheduler=decoder_scheduler, super_res_first=super_res, super_res_last=super_res,
                super_res_scheduler=super_res_scheduler)


def export_unclip(directory: str | Path, prior: DiffusionPrior, decoder: Decoder, upsampler: Upsampler) -> Path:
    """Write the components with `save_pretrained` in UnCLIPPipeline's sub-folders (prior/,
    prior_scheduler/, decoder/, text_proj/, decoder_scheduler/, super_res_first/, super_res_last/,
    super_res_scheduler/); safetensors weights, JSON configs. Returns `directory`."""
    directory = Path(directory)
    for name, component in unclip_components(prior, decoder, upsampler).items():
        component.save_pretrained(str(directory / name))
    return directory
