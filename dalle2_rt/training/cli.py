"""``dalle2-train``: train the unCLIP stages. Each subcommand calls the stage's Python function."""
from __future__ import annotations

import argparse
import dataclasses
import sys

EPILOG = """examples:
  dalle2-train all --config configs/shapes-v2.toml          # the bundled model's recipe
  dalle2-train decoder --config my.toml --max-steps 100     # resume/extend one stage, stop after 100 steps
  torchrun --nproc_per_node=2 -m dalle2_rt.training.cli prior --config my.toml   # data-parallel
  dalle2-train all --config configs/shapes-v2.toml --device cuda   # on a GPU (make train-gpu)

Checkpoints go to <out_dir>/<stage>/ (model.safetensors + model.json for export, state.* for resuming);
rerunning the same command resumes from the last checkpoint."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dalle2-train", description="Train the unCLIP stages of dalle2-rt.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["clip", "prior", "decoder", "sr", "all", "decoder_distill", "decoder_steps",
                                      "decoder_compact", "sr_steps"],
                   help="which stage to train (decoder_distill: guidance distillation of a trained decoder; "
                        "decoder_steps: step distillation of a guidance-distilled one; decoder_compact: fewer "
                        "U-Net blocks for a step-distilled one; sr_steps: step distillation of the SR stage)")
    p.add_argument("--config", required=True, help="TOML training config (see configs/)")
    p.add_argument("--out-dir", help="override [run] out_dir")
    p.add_argument("--max-steps", type=int, help="stop after this many steps of this run (checkpointed)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: the config's, else torch's)")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"],
                   help="where the networks train (default: the config's [run] device, else cpu); the data "
                        "and noise stay on the CPU, so a run draws the same batches on either")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        from dalle2_rt.training.config import ConfigError, load_config
    except ImportError as e:  # torch / open_clip missing: the train extra is not installed
        print(f"dalle2-train: {e}. Install the training extra: pip install -e '.[train]'", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(f"dalle2-train: {e}", file=sys.stderr)
        return 2
    if args.out_dir:
        cfg = dataclasses.replace(cfg, out_dir=args.out_dir)
    if args.threads:
        cfg = dataclasses.replace(cfg, threads=args.threads)
    if args.device:
        cfg = dataclasses.replace(cfg, device=args.device)
    if args.max_steps is not None and args.max_steps <= 0:
        print("dalle2-train: --max-steps must be positive", file=sys.stderr)
        return 2
    from dalle2_rt.training import distill, stages
    from dalle2_rt.training.loop import WarmStartError

    fn = {"clip": stages.train_clip, "prior": stages.train_prior, "decoder": stages.train_decoder,
          "sr": stages.train_sr, "all": stages.train_all, "decoder_distill": distill.train_decoder_distill,
          "decoder_steps": distill.train_decoder_steps, "decoder_compact": distill.train_decoder_compact,
          "sr_steps": distill.train_sr_steps}[args.stage]
    if args.stage in ("prior", "decoder") and not (cfg.stage_dir("clip") / "model").exists():
        print(f"dalle2-train: {args.stage} needs a trained CLIP in {cfg.stage_dir('clip')}/model; "
              "run `dalle2-train clip` first", file=sys.stderr)
        return 2
    from dalle2_rt.training.device import resolve_device

    try:
        resolve_device(cfg.device)
    except ValueError as e:
        print(f"dalle2-train: {e}", file=sys.stderr)
        return 2
    try:
        folder = fn(cfg, max_steps=args.max_steps)
    except (WarmStartError, distill.DistillError) as e:
        print(f"dalle2-train: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dalle2-train: interrupted; resume from the last checkpoint by rerunning", file=sys.stderr)
        return 130
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
