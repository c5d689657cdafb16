"""``trdq info | train | convert``: the installation, training and official-checkpoint import."""
from __future__ import annotations

from trdq_jax.cli._common import (add_config_args, add_debug, add_overwrite, blame, load_config,
                                  positive_int, print_json)


def _info(args) -> int:
    import jax

    from trdq_jax._version import __version__
    from trdq_jax.models import zoo
    print(f"trdq_jax {__version__} | jax {jax.__version__} | backend {jax.default_backend()} "
          f"| devices {jax.devices()}")
    present = set(zoo.available())
    for name, what in zoo.BUNDLED.items():
        print(f"  {'*' if name in present else ' '} {name:26s} {what}")
    print("(* = bundled checkpoint present)")
    print(f"compilation cache: {getattr(args, 'compile_cache', 'not set up')}")
    return 0


def _train(args) -> int:
    from trdq_jax.training import train
    cfg = load_config(args)
    with blame(None, workdir="--workdir", export_path="--export"):
        result = train(cfg, args.workdir, resume=not args.no_resume, progress=not args.quiet,
                       export_path=args.export)
    print_json({"step": int(result.step), "export": str(args.export or "")})
    return 0


def _convert(args) -> int:
    from trdq_jax import checkpoint
    from trdq_jax.config import to_dict
    from trdq_jax.models.convert import (convert_dit_state_dict, infer_dit_config, load_state_dict,
                                         pos_embed_report)
    from trdq_jax.files import resolve_target
    resolve_target(args.out, kind="float", overwrite=args.overwrite, is_dir=True, arg="--out")
    with blame(None, path="--input"):
        state_dict = load_state_dict(args.input)
    overrides = {"num_heads": args.num_heads} if args.num_heads else {}
    with blame("--input"):
        cfg = infer_dit_config(state_dict, pos_embed=args.pos_embed, **overrides)
        params = convert_dit_state_dict(state_dict, cfg)
    vae = None
    if args.vae_config is not None and args.vae is None:
        raise ValueError("--vae-config: only with --vae FILE (an LDM checkpoint)")
    if args.vae is not None:
        from trdq_jax.sampling.decode import check_vae_for, load_vae
        with blame("--vae", directory="--vae", path="--vae", config="--vae-config"):
            vae = load_vae(args.vae, args.vae_config)
            check_vae_for(cfg, vae[0], "--vae")
    # how far the checkpoint's table is from the 2-D sin-cos one (a learned table is fine)
    report = pos_embed_report(state_dict, cfg)
    extra = {"converted_from": str(args.input), "pos_embed": report}
    if vae is not None:
        extra["vae_from"] = str(args.vae)
    out = checkpoint.save(args.out, params, cfg, extra=extra, vae=vae,
                          overwrite=args.overwrite, arg="--out")
    print_json({"out": str(out), "config": to_dict(cfg), "pos_embed": report,
                **({"vae": to_dict(vae[0])} if vae else {})})
    return 0


def register(sub) -> None:
    p = sub.add_parser("info", help="versions, backend and bundled models")
    add_debug(p)
    p.set_defaults(func=_info)

    p = sub.add_parser("train", help="train a model from a config (resumable)")
    add_config_args(p, required=True)
    p.add_argument("--workdir", required=True,
                   help="checkpoints, config.json and metrics.jsonl go here (new or empty, or a "
                        "run of the same config to resume) (required)")
    p.add_argument("--export", metavar="DIR",
                   help="write the final (EMA) params as a trdq checkpoint here (replaces a "
                        "float checkpoint already there) (default: none, no export)")
    p.add_argument("--no-resume", action="store_true",
                   help="refuse to continue an existing run (default: off, a run of the same "
                        "config resumes)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar (default: off, a bar on a terminal)")
    add_debug(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("convert", help="convert an official DiT checkpoint to a trdq checkpoint")
    p.add_argument("--input", required=True, metavar="FILE",
                   help=".safetensors, .npz, or .pt/.pth (needs the [torch] extra) (required)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output checkpoint directory, new or empty (required)")
    p.add_argument("--num-heads", type=positive_int,
                   help="attention heads (default: inferred for the official sizes S/B/L/XL)")
    p.add_argument("--pos-embed", choices=("stored", "sincos"), default="stored",
                   help="'stored': keep the checkpoint's pos_embed table as a param (the "
                        "official model samples with it; a float16 checkpoint's rounded table "
                        "included); 'sincos': recompute the 2-D sin-cos table, refusing a "
                        "stored one that differs beyond its dtype's rounding (default: stored)")
    p.add_argument("--vae", metavar="PATH",
                   help="the VAE the DiT samples decode with, stored float in the checkpoint: a "
                        "diffusers AutoencoderKL directory (config.json + "
                        "diffusion_pytorch_model.safetensors, e.g. stabilityai/sd-vae-ft-ema) "
                        "or an LDM/SD checkpoint file (first_stage_model.* keys) (default: none, "
                        "samples stay latents)")
    p.add_argument("--vae-config", metavar="FILE",
                   help="with an LDM --vae file: the diffusers config.json of that VAE (default: "
                        "the SD-VAE's, block_out_channels 128,256,512,512)")
    add_overwrite(p, "float checkpoint")
    add_debug(p)
    p.set_defaults(func=_convert)
