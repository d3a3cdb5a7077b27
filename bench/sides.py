"""The contenders that run in this venv, as workers: ours (onnxruntime or torch backend) and diffusers.

    python -m bench.worker ours '{"engines": "...", "backend": "onnxruntime", "threads": 2}'
    python -m bench.worker diffusers '{"threads": 2, "configs": {clip, prior, decoder, sr model.json configs}}'

Each builder returns ``(run, info)``: ``run({"prompt", "images", "steps": [prior, decoder, sr], ...})`` makes
the images once and answers ``{"seconds": s}``; ``info`` has each network's parameter count and FLOPs per
call at batch 1 (counted the same way for every contender: ``torch.utils.flop_counter`` on the PyTorch
modules — 2 FLOPs per multiply-accumulate of mm/bmm/conv/attention — and, for our ONNX graphs, also
``bench.flops`` on the graph).
"""
from __future__ import annotations

import time

PROMPT = "a large red circle on the left, black background"


def torch_count(module, call) -> tuple[int, int]:
    """(parameters, FLOPs of ``call()``) of a torch module, with torch's own FLOP counter."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    params = sum(p.numel() for p in module.parameters())
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        call()
    return int(params), int(counter.get_total_flops())


# --------------------------------------------------------------------------------------------------------
# ours


def build_ours(engines: str, backend: str = "onnxruntime", threads: int | None = 2, warm: bool = True,
               prefix_cache: bool = True, flops: bool = True):
    """``flops`` False: the onnxruntime graphs' parameters only (the FLOP counter's shape probe feeds timesteps
    of a 1000-step chain, which a folder trained with fewer steps cannot take)."""
    from dalle2_rt.runtime.pipeline import Pipeline

    pipe = Pipeline.load(engines, backend=backend, threads=threads, prefix_cache=prefix_cache,
                         shared_threads=backend == "onnxruntime")  # as the CLI runs
    info = {"backend": pipe.backend.describe(), "engines": str(engines),
            "graphs": {g: e.description for g, e in pipe.engines.items()}}
    if backend == "torch":
        info["networks"] = _our_torch_counts(pipe)
    else:
        from .flops import count_flops, count_params

        info["networks"] = {}
        for g in ("prior", "decoder", "sr0"):
            spec = pipe.manifest.graphs[g]
            info["networks"][g] = {"params": count_params(spec.file)}
            if flops:
                info["networks"][g]["flops"] = count_flops(spec.file, 1)["flops"]
    if warm:
        pipe(PROMPT, seed=0, num_images=1)
        info["backend"] = pipe.backend.describe()  # after a run: which graphs (int8 variants included) ran
        info["int8"] = pipe.backend.int8_running

    def run(req: dict) -> dict:
        prior, decoder, sr = req.get("steps") or (None, None, None)
        t0 = time.perf_counter()
        images = pipe(req.get("prompt", PROMPT), seed=int(req.get("seed", 0)), num_images=int(req.get("images", 1)),
                      prior_steps=prior, decoder_steps=decoder, sr_steps=sr, candidates=req.get("candidates"),
                      # one decoder sample per image, as every contender draws (ranked candidates are ours alone)
                      decoder_candidates=req.get("decoder_candidates", 1),
                      prior_guidance=req.get("prior_guidance"), decoder_guidance=req.get("decoder_guidance"),
                      sampler=req.get("sampler"))
        return {"seconds": time.perf_counter() - t0, "images": len(images)}

    return run, info


def _our_torch_counts(pipe) -> dict:
    """Params and FLOPs at batch 1 of the torch modules behind the torch backend's prior/decoder/sr0 (the
    full prior: the network, whichever graphs of it the pipeline runs)."""
    import torch

    from .feeds import graph_inputs

    out = {}
    for g in ("prior", "decoder", "sr0"):
        engine = pipe.engines.get(g) or pipe.backend.engine(g)
        feeds = {k: torch.from_numpy(v) for k, v in graph_inputs(engine.spec, 1).items()}
        params, flops = torch_count(engine.module, lambda e=engine, f=feeds: e.module(**f))
        out[g] = {"params": params, "flops": flops}
    return out


# --------------------------------------------------------------------------------------------------------
# diffusers UnCLIPPipeline, configured from our checkpoints' model configs (nothing downloaded)


def diffusers_pipeline(vocab_dir, configs: dict):
    """A random-weight ``UnCLIPPipeline`` with our networks' shapes, from our ``model.json`` configs
    (``configs[stage]``): CLIP text tower of the same width/depth/heads; ``PriorTransformer`` of the prior's
    width, depth and heads; decoder ``UNet2DConditionModel`` with our channels × multipliers, resnet blocks,
    cross-attention at our attention levels (context = our context width), timestep embedding width;
    SR ``UNet2DModel`` likewise (two copies: super_res_first and super_res_last, as the pipeline wants)."""
    import torch
    from diffusers import PriorTransformer, UnCLIPPipeline, UnCLIPScheduler, UNet2DConditionModel, UNet2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    from export.diffusers_unclip import _text_proj_class

    clip, pc, dc, sc = configs["clip"], configs["prior"], configs["decoder"], configs["sr"]
    du, su = dc["unet"], sc["unet"]
    torch.manual_seed(0)
    tokenizer = CLIPTokenizer(vocab=str(vocab_dir / "vocab.json"), merges=str(vocab_dir / "merges.txt"),
                              model_max_length=clip["context_length"])
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=clip["vocab_size"], hidden_size=clip["text_width"], projection_dim=clip["embed_dim"],
        intermediate_size=4 * clip["text_width"], num_attention_heads=clip["text_heads"],
        num_hidden_layers=clip["text_layers"], max_position_embeddings=clip["context_length"],
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    prior = PriorTransformer(num_attention_heads=pc["heads"], attention_head_dim=pc["dim"] // pc["heads"],
                             num_layers=pc["depth"], embedding_dim=pc["embed_dim"], num_embeddings=pc["context_length"],
                             additional_embeddings=4)
    text_proj = _text_proj_class()(clip_extra_context_tokens=dc["num_image_tokens"],
                                   clip_embeddings_dim=dc["embed_dim"], time_embed_dim=du["emb_dim"],
                                   cross_attention_dim=dc["context_dim"])
    levels = range(len(du["channel_mults"]))
    attn = set(du["attention_levels"])
    decoder = UNet2DConditionModel(
        sample_size=dc["image_size"], in_channels=3, out_channels=6, layers_per_block=du["num_res_blocks"],
        block_out_channels=tuple(du["channels"] * m for m in du["channel_mults"]),
        down_block_types=tuple("SimpleCrossAttnDownBlock2D" if i in attn else "ResnetDownsampleBlock2D"
                               for i in levels),
        up_block_types=tuple("SimpleCrossAttnUpBlock2D" if i in attn else "ResnetUpsampleBlock2D"
                             for i in reversed(levels)),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=dc["context_dim"],
        attention_head_dim=du["channels"] * max(du["channel_mults"]) // du["heads"], time_embedding_dim=du["emb_dim"],
        norm_num_groups=du["groups"], resnet_time_scale_shift="scale_shift", class_embed_type="identity")
    sr_levels = range(len(su["channel_mults"]))
    sr_attn = set(su["attention_levels"])
    sr = {"sample_size": sc["image_size"], "in_channels": 6, "out_channels": 3,
          "layers_per_block": su["num_res_blocks"],
          "block_out_channels": tuple(su["channels"] * m for m in su["channel_mults"]),
          "down_block_types": tuple("AttnDownBlock2D" if i in sr_attn else "DownBlock2D" for i in sr_levels),
          "up_block_types": tuple("AttnUpBlock2D" if i in sr_attn else "UpBlock2D" for i in reversed(sr_levels)),
          "norm_num_groups": su["groups"], "time_embedding_dim": su["emb_dim"]}
    pipe = UnCLIPPipeline(
        prior=prior, decoder=decoder, text_encoder=text_encoder, tokenizer=tokenizer, text_proj=text_proj,
        super_res_first=UNet2DModel(**sr), super_res_last=UNet2DModel(**sr),
        prior_scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample",
                                        clip_sample_range=5.0),
        decoder_scheduler=UnCLIPScheduler(variance_type="learned_range", prediction_type="epsilon"),
        super_res_scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="epsilon"),
    ).to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _diffusers_counts(pipe) -> dict:
    import torch

    b, dec, sr = 1, pipe.decoder.config, pipe.super_res_first.config
    emb, ctx_len = pipe.prior.config.embedding_dim, pipe.prior.config.num_embeddings
    mask = torch.ones(b, ctx_len, dtype=torch.bool)
    prior = torch_count(pipe.prior, lambda: pipe.prior(
        torch.randn(b, emb), timestep=torch.tensor(5), proj_embedding=torch.randn(b, emb),
        encoder_hidden_states=torch.randn(b, ctx_len, emb), attention_mask=mask))
    ctx = ctx_len + pipe.text_proj.clip_extra_context_tokens
    size = dec.sample_size
    decoder = torch_count(pipe.decoder, lambda: pipe.decoder(
        torch.randn(b, 3, size, size), 5, encoder_hidden_states=torch.randn(b, ctx, dec.cross_attention_dim),
        class_labels=torch.randn(b, dec.time_embedding_dim or 4 * dec.block_out_channels[0]),
        attention_mask=torch.ones(b, ctx, dtype=torch.bool)))
    tp_params = sum(p.numel() for p in pipe.text_proj.parameters())
    up = torch_count(pipe.super_res_first, lambda: pipe.super_res_first(
        torch.randn(b, sr.in_channels, sr.sample_size, sr.sample_size), 5))
    return {"prior": {"params": prior[0], "flops": prior[1]},
            "decoder": {"params": decoder[0] + tp_params, "flops": decoder[1], "note": "U-Net + text_proj"},
            "sr0": {"params": up[0], "flops": up[1], "note": "one of the two SR U-Nets (first/last)"}}


def build_diffusers(configs: dict, threads: int = 2, warm: bool = True):
    import tempfile
    from pathlib import Path

    import diffusers
    import torch

    from tests.test_diffusers_interop import write_clip_vocab  # CLIP BPE vocab from open_clip's bundled file

    torch.set_num_threads(threads)
    vocab = write_clip_vocab(Path(tempfile.mkdtemp(prefix="bench-vocab-")))
    pipe = diffusers_pipeline(vocab, configs)
    info = {"diffusers": diffusers.__version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "networks": _diffusers_counts(pipe)}

    def run(req: dict) -> dict:
        prior, decoder, sr = req.get("steps") or (25, 25, 7)
        n = int(req.get("images", 1))
        gen = torch.Generator().manual_seed(int(req.get("seed", 0)))
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = pipe(req.get("prompt", PROMPT), num_images_per_prompt=n, prior_num_inference_steps=prior,
                       decoder_num_inference_steps=decoder, super_res_num_inference_steps=sr, generator=gen,
                       prior_guidance_scale=float(req.get("prior_guidance", 4.0)),
                       decoder_guidance_scale=float(req.get("decoder_guidance", 5.0)), output_type="np")
        return {"seconds": time.perf_counter() - t0, "images": len(out.images)}

    if warm:
        run({"images": 1})
    return run, info
