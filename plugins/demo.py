"""``discon demo``: a browser demo (Gradio, the optional ``[demo]`` extra) of a DisCon pipeline.

    pip install -e '.[demo]' && discon demo            # the embedded default, http://127.0.0.1:7860
    discon demo --model FOLDER --port 8080             # an exported pipeline folder

Pick a class, the prior's guidance and temperature, the continuous stage's AR steps and a seed;
each click shows the DisCon images beside the discrete tokenizer's decode of the *same* prior
tokens (the paper's Figure 2, as ``discon run --compare-discrete`` writes it). The server listens
on ``--host`` (default 127.0.0.1, this machine only); ``--share`` (Gradio's public tunnel) is off
unless asked for.

:func:`generate_pair` is the whole computation, a plain function; :func:`build_ui` only wires
Gradio widgets to it. Gradio is imported when the command runs, never by ``discon`` itself.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from discon_core import cli
from discon_core.errors import DisconError
from discon_core.hooks import hookimpl

MAX_IMAGES = 16  # per click: one row of the grid
INSTALL_HINT = "discon demo needs Gradio: pip install 'discon[demo]'"


@dataclass
class DemoResult:
    """One click: DisCon images and the discrete decode of the same prior tokens."""
    discon: torch.Tensor          # float32 [B,3,H,W] in [0,1]
    discrete: torch.Tensor | None  # the dtok's decode of ``tokens``; None without a dtok
    tokens: torch.Tensor          # int64 [B,h,w]: the prior's sample both were made from


def generate_pair(pipe, label: int, *, num: int = 8, seed: int = 0,
                  prior_cfg: float | None = None, prior_temperature: float | None = None,
                  ar_steps: int | None = None) -> DemoResult:
    """``num`` images of class ``label`` from a DisCon pipeline, seeded by ``seed`` (the same
    arguments give the same images); None settings take the presets' sampling defaults."""
    if pipe.mode != "discon":
        raise DisconError(f"discon demo needs a DisCon pipeline (prior, backbone, head, ctok), "
                          f"this one is {pipe.mode!r}")
    if not 1 <= int(num) <= MAX_IMAGES:
        raise DisconError(f"images per click must be in [1, {MAX_IMAGES}], got {num}")
    if seed is None or not 0 <= int(seed) < 2 ** 63:  # the page's number box may be anything
        raise DisconError(f"seed must be an integer in [0, 2**63), got {seed}")
    if label is None:
        raise DisconError("pick a class")
    device = next(pipe.backbone.parameters()).device
    labels = torch.full((int(num),), int(label), dtype=torch.long)
    generator = torch.Generator(device=device).manual_seed(int(seed))
    images, tokens, _ = pipe.generate(labels, prior_cfg=prior_cfg,
                                      prior_temperature=prior_temperature, ar_steps=ar_steps,
                                      generator=generator, progress=False, return_tokens=True)
    discrete = None
    if pipe.dtok is not None:
        discrete = pipe.dtok.decode(tokens.to(next(pipe.dtok.parameters()).device)).float().cpu()
    return DemoResult(images.float().cpu(), discrete, tokens.cpu())


def class_choices(pipe) -> list[tuple[str, int]]:
    """(name, id) per class: the prior preset's class names, else the ids themselves."""
    from discon_core.data import class_names

    preset = getattr(pipe.prior, "discon_preset", None)
    names = class_names(getattr(preset, "classes", None))
    return [(names[i] if i < len(names) else str(i), i) for i in range(pipe.num_classes)]


def sampling_defaults(pipe) -> dict[str, float]:
    """The presets' settings the sliders start at (what ``discon run`` uses by default)."""
    def sampling(module) -> dict:
        preset = getattr(module, "discon_preset", None)
        return dict(preset.sampling) if preset is not None else {}

    prior, cont = sampling(pipe.prior), sampling(pipe.backbone)
    return {"prior_cfg": float(prior.get("cfg_scale", 1.0)),
            "prior_temperature": float(prior.get("temperature", 1.0)),
            "ar_steps": int(cont.get("ar_steps", 16))}


def enlarge(images: torch.Tensor, size: int = 96) -> np.ndarray:
    """A uint8 grid of four images a row, nearest-neighbour enlarged so that 32 px images show
    at ``size`` px."""
    from discon_core.images import make_grid

    grid = make_grid(images, nrow=min(4, len(images)))
    scale = max(1, size // images.shape[-1])
    return grid.repeat(scale, axis=0).repeat(scale, axis=1)


def build_ui(pipe, *, seed: int = 0):
    """The Gradio Blocks app over :func:`generate_pair` (not launched)."""
    gr = import_gradio()
    choices, defaults = class_choices(pipe), sampling_defaults(pipe)

    def on_click(label, num, seed_value, prior_cfg, prior_temperature, ar_steps):
        try:
            out = generate_pair(pipe, label, num=num, seed=seed_value, prior_cfg=prior_cfg,
                                prior_temperature=prior_temperature, ar_steps=int(ar_steps))
        except DisconError as e:  # shown in the page, the server keeps running
            raise gr.Error(str(e)) from None
        return enlarge(out.discon), None if out.discrete is None else enlarge(out.discrete)

    with gr.Blocks(title="discon demo") as ui:
        gr.Markdown("## DisCon: discrete-conditioned continuous AR generation\n"
                    "The prior samples discrete tokens; DisCon completes continuous tokens from "
                    "them (left). Right: the same tokens decoded by the discrete tokenizer.")
        with gr.Row():
            label = gr.Dropdown(choices, value=choices[0][1], label="class", elem_id="class")
            num = gr.Slider(1, MAX_IMAGES, value=8, step=1, label="images")
            seed_box = gr.Number(seed, precision=0, label="seed", elem_id="seed")
        with gr.Row():
            prior_cfg = gr.Slider(1.0, max(10.0, defaults["prior_cfg"]), step=0.5,
                                  value=defaults["prior_cfg"], label="prior guidance (CFG)")
            prior_temp = gr.Slider(0.1, 2.0, step=0.05, value=defaults["prior_temperature"],
                                   label="prior temperature")
            ar_steps = gr.Slider(1, pipe.backbone.seq_len, step=1, value=defaults["ar_steps"],
                                 label="continuous AR steps")
        button = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Row():
            discon = gr.Image(label="DisCon", elem_id="discon-image", interactive=False)
            discrete = gr.Image(label="discrete decode of the same tokens",
                                elem_id="discrete-image", interactive=False,
                                visible=pipe.dtok is not None)
        button.click(on_click, [label, num, seed_box, prior_cfg, prior_temp, ar_steps],
                     [discon, discrete])
    return ui


def import_gradio():
    """gradio, or the one-line install hint; its usage statistics stay off unless set."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio
    except ImportError:
        raise DisconError(INSTALL_HINT) from None
    return gradio


def load_pipeline(model: str | None, *, device, dtype):
    """The embedded default (``model`` None) or the pipeline of an exported folder."""
    from discon_core.pipeline import Pipeline

    return Pipeline.from_pretrained(model, device=device, dtype=dtype)


def launch(ui, *, host: str, port: int | None, share: bool = False) -> str:
    """Serve ``ui`` in a background thread; returns the address (the share link's too). The
    caller blocks with ``ui.block_thread()`` or stops it with ``ui.close()``."""
    try:
        _, local, public = ui.launch(server_name=host, server_port=port, share=share, quiet=True,
                                     prevent_thread_lock=True)
    except OSError as e:  # the port is taken or the address is not this machine's
        reason = str(e).split(". ")[0]  # Gradio's advice after it names launch() arguments
        raise DisconError(f"--host {host} --port {port}: cannot serve there ({reason})") from None
    return local + (f" and {public}" if public else "")


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="a browser demo (Gradio): DisCon beside the discrete decode "
                                    "of the same tokens; pip install 'discon[demo]'")
    p.add_argument("--model", default=None, metavar="FOLDER",
                   help="an exported pipeline folder (default: the embedded Fashion-MNIST one)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=None,
                   help="port (default: Gradio's, 7860 or the next free one)")
    p.add_argument("--share", action="store_true",
                   help="also open a public Gradio share link (off by default)")
    p.add_argument("--seed", type=int, default=0, help="the seed the page starts with")
    cli.add_device_option(p)
    cli.add_dtype_option(p)
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    from discon_core.precision import resolve_dtype
    from discon_core.runtime import resolve_device

    import_gradio()  # the install hint before any weights load
    if args.port is not None and not 1 <= args.port <= 65535:
        raise DisconError(f"--port must be in [1, 65535], got {args.port}")
    device = resolve_device(args.device)
    pipe = load_pipeline(args.model, device=device,
                         dtype=resolve_dtype(args.dtype, device, "--dtype"))
    generate_pair(pipe, 0, num=1, seed=args.seed)  # fail here, not in the page, on a bad model
    ui = build_ui(pipe, seed=args.seed)
    print(f"discon demo: serving {launch(ui, host=args.host, port=args.port, share=args.share)}"
          " (Ctrl+C stops it)", flush=True)
    ui.block_thread()
    return 0


@hookimpl
def discon_register_commands(subparsers) -> None:
    _add_demo(subparsers)
