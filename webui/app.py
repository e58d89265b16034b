"""The Gradio page: layout and wiring only. Every action is one call into sdlora.studio.Studio.

Each event has an api_name, so the page's functions can be driven with gradio_client exactly as
the browser drives them (the tests do).
"""

from __future__ import annotations

import json
import random
from functools import wraps
from types import SimpleNamespace

import gradio as gr

from sdlora.choices import FILE_FORMATS, TRAIN_METHODS, TRAIN_QUANT
from sdlora.errors import SdloraError
from sdlora.library import LibraryEntry
from sdlora.schedulers import DEFAULT_SCHEDULER, SCHEDULERS
from sdlora.studio import Slot, Studio
from sdlora.training.config import TrainConfig

SLOTS = 4  # rows in the adapter mixer; <lora:name:w> tags in the prompt add more
SLOT_FIELDS = 6  # name, UNet weight, text-encoder weight, on, block weights, step range


def _user_errors(fn):
    """Our errors become a message on the page (and an error for API clients), never a traceback."""
    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SdloraError as err:
            raise gr.Error(str(err)) from None
    return wrapper


def _slots(values) -> list[Slot]:
    """The mixer's flat field values, SLOT_FIELDS per row, as Slots."""
    rows = [values[i : i + SLOT_FIELDS] for i in range(0, len(values), SLOT_FIELDS)]
    return [Slot(name=n or "", unet=u, text_encoder=t, enabled=bool(on), blocks=b or "", steps=s or "")
            for n, u, t, on, b, s in rows]


def _weights(text: str) -> list[float]:
    try:
        return [float(v) for v in text.replace(";", ",").split(",") if v.strip()]
    except ValueError:
        raise SdloraError(f"cannot read the weights {text!r}", "write numbers separated by commas") from None


def _names_dropdown(choices, **kwargs) -> gr.Dropdown:
    """The listing changes while the page is open (training, export, merge, rename), and a stale
    page's choices must not block it: any value is accepted here, and the Studio accepts only names
    that are in the library's listing at the time of the call."""
    return gr.Dropdown(choices, allow_custom_value=True, **kwargs)


def _generate_tab(studio: Studio) -> SimpleNamespace:
    """The Generate tab: prompt, settings, the adapter mixer, the gallery and the X/Y grid."""
    lim, names = studio.limits, studio.library.names
    native = studio.base.native_size
    with gr.Tab("Generate"):
        prompt = gr.Textbox(label="Prompt", lines=2, max_length=lim.max_prompt_chars, elem_id="prompt",
                            placeholder="a red circle <lora:name:0.8>")
        negative = gr.Textbox(label="Negative prompt", max_length=lim.max_prompt_chars)
        with gr.Row():
            seed = gr.Number(label="Seed", value=0, precision=0, minimum=0, elem_id="seed")
            dice = gr.Button("Random seed", elem_id="dice", scale=0)
            steps = gr.Slider(1, lim.max_steps, value=20, step=1, label="Steps")
            guidance = gr.Slider(0, 30, value=5, step=0.5, label="Guidance")
        with gr.Row():
            width = gr.Slider(8, lim.max_side, value=native, step=8, label="Width")
            height = gr.Slider(8, lim.max_side, value=native, step=8, label="Height")
            scheduler = gr.Dropdown(list(SCHEDULERS), value=DEFAULT_SCHEDULER, label="Sampler")
            num = gr.Slider(1, lim.max_images, value=1, step=1, label="Images")
        gr.Markdown("Adapters (or `<lora:name:weight>` in the prompt)")
        slot_fields = []
        for i in range(SLOTS):
            with gr.Row():
                slot_fields += [
                    _names_dropdown(names(), value=None, label=f"Adapter {i + 1}", elem_id=f"slot{i}-name"),
                    gr.Slider(-lim.max_weight, lim.max_weight, value=1.0, step=0.05, label="UNet weight",
                              elem_id=f"slot{i}-unet"),
                    gr.Slider(-lim.max_weight, lim.max_weight, value=1.0, step=0.05, label="Text-encoder weight",
                              elem_id=f"slot{i}-te"),
                    gr.Checkbox(True, label="On", elem_id=f"slot{i}-on"),
                    gr.Textbox(label="Block weights", placeholder="down=1, mid=0.5, IN05=0 or an LBW preset: MIDD"),
                    gr.Textbox(label="Step range", placeholder="0-20"),
                ]
        with gr.Row():
            refresh = gr.Button("Refresh adapter list")
            go = gr.Button("Generate", variant="primary", elem_id="generate")
        gallery = gr.Gallery(label="Pictures", elem_id="gallery", columns=4, height=360, object_fit="contain")
        with gr.Accordion("X/Y grid", open=False):
            with gr.Row():
                x_name = _names_dropdown(names(), label="X: adapter")
                x_weights = gr.Textbox("0, 0.5, 1", label="X weights")
                y_name = _names_dropdown(names(), label="Y: adapter")
                y_weights = gr.Textbox("0, 0.5, 1", label="Y weights")
            grid_go = gr.Button("Make grid")
            grid = gr.Image(label="Grid", type="filepath")

    return SimpleNamespace(prompt=prompt, negative=negative, seed=seed, dice=dice, steps=steps, guidance=guidance,
                           width=width, height=height, scheduler=scheduler, num=num, slot_fields=slot_fields,
                           refresh=refresh, go=go, gallery=gallery, x_name=x_name, x_weights=x_weights,
                           y_name=y_name, y_weights=y_weights, grid_go=grid_go, grid=grid)


def _train_tab(studio: Studio) -> SimpleNamespace:
    """The Train tab: dataset, the settings of `sdlora train` (its defaults), progress and samples."""
    with gr.Tab("Train"):
        with gr.Row():
            dataset = _names_dropdown(studio.datasets(), label="Dataset (folders under the data root)")
            upload = gr.File(label="Or upload pictures and .txt captions", file_count="multiple")
            upload_name = gr.Textbox(label="New dataset name")
            upload_go = gr.Button("Add dataset")
        with gr.Row():
            t_name = gr.Textbox(label="Adapter name", value="my-style")
            t_method = gr.Radio(list(TRAIN_METHODS), value=TrainConfig.method, label="Method")
            # The defaults of `sdlora train` (TrainConfig), so the page and the CLI train alike.
            t_rank = gr.Slider(1, 128, value=TrainConfig.rank, step=1, label="Rank")
            t_steps = gr.Slider(1, 5000, value=TrainConfig.steps, step=1, label="Steps")
            t_lr = gr.Number(TrainConfig.lr, label="Learning rate")
        with gr.Row():
            t_trigger = gr.Textbox(label="Trigger word (optional)")
            t_quant = gr.Radio(list(TRAIN_QUANT), value=TrainConfig.quant, label="Base quantization")
            t_prompt = gr.Textbox(label="Validation prompt (optional)")
        with gr.Row():
            t_start = gr.Button("Start training", variant="primary")
            t_stop = gr.Button("Stop")
        t_status = gr.Textbox(label="Status", interactive=False)
        t_progress = gr.Slider(0, 100, value=0, label="Progress (%)", interactive=False)
        t_loss = gr.LinePlot(x="step", y="loss", label="Loss", height=220)
        t_samples = gr.Gallery(label="Validation pictures", columns=2)
        timer = gr.Timer(1.0)

    return SimpleNamespace(dataset=dataset, upload=upload, upload_name=upload_name, upload_go=upload_go,
                           t_name=t_name, t_method=t_method, t_rank=t_rank, t_steps=t_steps, t_lr=t_lr,
                           t_trigger=t_trigger, t_quant=t_quant, t_prompt=t_prompt, t_start=t_start, t_stop=t_stop,
                           t_status=t_status, t_progress=t_progress, t_loss=t_loss, t_samples=t_samples, timer=timer)


def _adapters_tab(studio: Studio) -> SimpleNamespace:
    """The Adapters tab: the library table, inspect, export, merge, rename, delete."""
    names = studio.library.names
    with gr.Tab("Adapters"):
        table = gr.Dataframe(headers=LibraryEntry.columns(), interactive=False, label="Library")
        with gr.Row():
            chosen = _names_dropdown(names(), label="Adapter")
            inspect_go = gr.Button("Inspect")
        details = gr.Code(label="Details", language="json", interactive=False)  # text, never HTML
        with gr.Row():
            fmt = gr.Radio(list(FILE_FORMATS), value="kohya", label="Export as")
            export_go = gr.Button("Export")
        with gr.Row():
            merge_names = _names_dropdown(names(), multiselect=True, label="Merge these")
            merge_weights = gr.Textbox(label="with weights", placeholder="1, 1")
            merge_name = gr.Textbox(label="into")
            merge_go = gr.Button("Merge")
        with gr.Row():
            new_name = gr.Textbox(label="Rename to")
            rename_go = gr.Button("Rename")
            confirm = gr.Textbox(label="Type the name to delete it")
            delete_go = gr.Button("Delete", variant="stop")
        message = gr.Textbox(label="Result", interactive=False)

    return SimpleNamespace(table=table, chosen=chosen, inspect_go=inspect_go, details=details, fmt=fmt,
                           export_go=export_go, merge_names=merge_names, merge_weights=merge_weights,
                           merge_name=merge_name, merge_go=merge_go, new_name=new_name, rename_go=rename_go,
                           confirm=confirm, delete_go=delete_go, message=message)


def _wire_generate(studio: Studio, page: gr.Blocks, g: SimpleNamespace, listing, listing_outputs) -> None:
    """The library listing (refresh, page load), the seed dice, generate and the X/Y grid."""
    g.refresh.click(listing, None, listing_outputs, api_name="library")
    page.load(listing, None, listing_outputs, api_name=False)
    g.dice.click(lambda: random.randrange(2**32), None, g.seed, api_name="dice")

    @_user_errors
    def do_generate(prompt, negative, seed, steps, guidance, width, height, scheduler, num, *slot_values):
        return studio.generate(prompt, _slots(slot_values), negative=negative, seed=int(seed), steps=int(steps),
                               guidance=guidance, width=int(width), height=int(height), scheduler=scheduler,
                               num=int(num))

    settings_inputs = [g.prompt, g.negative, g.seed, g.steps, g.guidance, g.width, g.height, g.scheduler, g.num]
    g.go.click(do_generate, settings_inputs + g.slot_fields, g.gallery, api_name="generate")

    @_user_errors
    def do_grid(xn, xw, yn, yw, prompt, negative, seed, steps, guidance, width, height, scheduler, num,
                *slot_values):
        return str(studio.xy_grid(prompt, _slots(slot_values), xn, _weights(xw), yn, _weights(yw),
                                  negative=negative, seed=int(seed), steps=int(steps), guidance=guidance,
                                  width=int(width), height=int(height), scheduler=scheduler))

    g.grid_go.click(do_grid, [g.x_name, g.x_weights, g.y_name, g.y_weights] + settings_inputs + g.slot_fields, g.grid,
                    api_name="xy_grid")


def _wire_train(studio: Studio, t: SimpleNamespace) -> None:
    """Dataset upload, start, stop and the once-a-second progress poll."""
    @_user_errors
    def do_upload(files, name):
        added = studio.add_dataset(name, [f if isinstance(f, str) else f.name for f in (files or [])])
        return gr.update(choices=studio.datasets(), value=added)

    t.upload_go.click(do_upload, [t.upload, t.upload_name], t.dataset, api_name="add_dataset")

    @_user_errors
    def do_start(dataset, name, method, rank, steps, lr, trigger, quant, val_prompt):
        job = studio.start_training(dataset, name, method=method, rank=int(rank), steps=int(steps), lr=float(lr),
                                    trigger=trigger or None, quant=quant,
                                    validation_prompts=(val_prompt,) if val_prompt else None,
                                    validate_every=max(1, int(steps) // 4) if val_prompt else None)
        return f"{job.status}: {job.name}"

    t.t_start.click(do_start, [t.dataset, t.t_name, t.t_method, t.t_rank, t.t_steps, t.t_lr, t.t_trigger, t.t_quant,
                               t.t_prompt], t.t_status, api_name="train_start")
    t.t_stop.click(lambda: studio.stop_training() or "stopping", None, t.t_status, api_name="train_stop")

    def poll():
        import pandas as pd

        job = studio.job()
        if job is None:
            return "no training run yet", 0, pd.DataFrame({"step": [], "loss": []}), []
        text = f"{job.status}: {job.name}, step {job.step}/{job.total}"
        text += f" - {job.error}" if job.error else (f" - in the library as {job.adapter}" if job.adapter else "")
        losses = pd.DataFrame({"step": list(range(1, len(job.losses) + 1)), "loss": list(job.losses)})
        return text, 100 * job.step / max(1, job.total), losses, [str(p) for p in job.samples()]

    t.timer.tick(poll, None, [t.t_status, t.t_progress, t.t_loss, t.t_samples], api_name="train_status")


def _wire_adapters(studio: Studio, a: SimpleNamespace, listing, listing_outputs) -> None:
    """Inspect, export, merge, rename, delete; the listing refreshes after each change."""
    @_user_errors
    def do_inspect(name):
        return json.dumps(studio.library.inspect(name), indent=2, sort_keys=True, default=str)

    a.inspect_go.click(do_inspect, a.chosen, a.details, api_name="inspect")

    @_user_errors
    def do_export(name, fmt):
        return f"exported as {studio.library.export(name, fmt, studio.base)}"

    a.export_go.click(do_export, [a.chosen, a.fmt], a.message, api_name="export")

    @_user_errors
    def do_merge(chosen_names, weights, new):
        weights = _weights(weights) if weights and weights.strip() else [1.0] * len(chosen_names or [])
        if len(weights) != len(chosen_names or []):
            raise SdloraError(f"{len(chosen_names or [])} adapters but {len(weights)} weights", "give one each")
        limit = studio.limits.max_weight  # the mixer's bound, here too: a merge at 1e308 wrote inf into the library
        if any(not abs(w) <= limit for w in weights):
            raise SdloraError(f"merge weights must lie within +-{limit:g}, got {weights}",
                              f"use weights between -{limit:g} and {limit:g}")
        return f"merged into {studio.library.merge(list(zip(chosen_names, weights)), new, studio.base)}"

    a.merge_go.click(do_merge, [a.merge_names, a.merge_weights, a.merge_name], a.message, api_name="merge")

    @_user_errors
    def do_rename(name, new):
        return f"renamed to {studio.library.rename(name, new)}"

    a.rename_go.click(do_rename, [a.chosen, a.new_name], a.message, api_name="rename")

    @_user_errors
    def do_delete(name, typed):
        studio.library.delete(name, typed)
        return f"deleted {name}"

    a.delete_go.click(do_delete, [a.chosen, a.confirm], a.message, api_name="delete")
    for button in (a.export_go, a.merge_go, a.rename_go, a.delete_go):
        button.click(listing, None, listing_outputs, api_name=False)


def build(studio: Studio) -> gr.Blocks:
    """The page: three tabs, then their wiring (events registered in this order, as the API lists them)."""
    with gr.Blocks(title="sdlora") as page:
        gr.Markdown("# sdlora")
        g, t, a = _generate_tab(studio), _train_tab(studio), _adapters_tab(studio)
        name_dropdowns = [g.slot_fields[i * SLOT_FIELDS] for i in range(SLOTS)] + [g.x_name, g.y_name, a.chosen]

        def listing():
            rows = [e.row() for e in studio.library.entries()]
            choices = studio.library.names()
            return [rows] + [gr.update(choices=choices) for _ in name_dropdowns] + [gr.update(choices=choices)]

        listing_outputs = [a.table, *name_dropdowns, a.merge_names]
        _wire_generate(studio, page, g, listing, listing_outputs)
        _wire_train(studio, t)
        _wire_adapters(studio, a, listing, listing_outputs)
    return page


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def allowed_hosts(host: str, extra: list[str] | tuple[str, ...] = ()) -> frozenset[str]:
    """The host names a request may address: the loopback names, the bound address (unless it is a wildcard)
    and the --allowed-hosts given. Jupyter and Django keep such a list against DNS rebinding."""
    names = {*LOOPBACK_HOSTS, *(h.strip().lower().strip("[]") for h in extra if h.strip())}
    if host not in ("0.0.0.0", "::", ""):
        names.add(host.lower().strip("[]"))
    return frozenset(names)


def _hostname(netloc: str) -> str:
    from urllib.parse import urlsplit

    return (urlsplit(f"//{netloc}").hostname or "").lower()


class SameOriginOnly:
    """ASGI middleware against pages elsewhere driving this one through a visitor's browser:
    - the Host header must name a host this server was started for (allowed_hosts): a DNS-rebinding page
      (its own name pointed at 127.0.0.1) sends Host and Origin both `evil.example:PORT`, which pass the
      second check alone;
    - an Origin header must name the same site as the Host (Gradio's own CORS check only withholds the
      response headers; the request still runs).
    Either failure is a 403 (websockets: closed with 1008) before the app sees the request."""

    def __init__(self, app, hosts: frozenset[str] = frozenset(LOOPBACK_HOSTS)):
        self.app = app
        self.hosts = hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            from urllib.parse import urlsplit

            headers = dict(scope["headers"])
            origin = headers.get(b"origin", b"").decode("latin-1")
            host = headers.get(b"host", b"").decode("latin-1")
            reason = None
            if _hostname(host) not in self.hosts:
                reason = f"host {host!r} is not one this server was started for (see --allowed-hosts)"
            elif origin and urlsplit(origin).netloc != host:
                reason = f"cross-origin request from {origin} refused"
            if reason:
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                from starlette.responses import PlainTextResponse

                await PlainTextResponse(f"{reason}: refused", 403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def parse_auth(auth: str) -> tuple[str, str]:
    user, sep, password = auth.partition(":")
    if not sep or not user or not password:
        raise SdloraError("--auth must be USER:PASS", "pass e.g. --auth me:a-long-password")
    return user, password


def launch_options(studio: Studio, host: str = "127.0.0.1", port: int | None = None, auth: str | None = None,
                   share: bool = False, extra_hosts: tuple[str, ...] = (), api: bool = False,
                   api_auth: str | None = None) -> dict:
    """Blocks.launch arguments: local by default, only the library and output folders served, uploads
    capped, no monitoring page, no share link unless asked. api: A1111's /sdapi/v1 routes beside the page
    (webui/a1111.py), behind the same Host/Origin check and their own --api-auth (the page's --auth is not
    theirs, as in A1111)."""
    from starlette.middleware import Middleware

    middleware = [Middleware(SameOriginOnly, hosts=allowed_hosts(host, extra_hosts))]
    if api:
        from .a1111 import MountApi, api_app

        middleware.append(Middleware(MountApi, api=api_app(studio, api_auth)))
    options = dict(server_name=host, server_port=port, share=share, enable_monitoring=False, strict_cors=True,
                   allowed_paths=[str(studio.outputs), str(studio.library.folder)],
                   max_file_size=f"{studio.limits.max_upload_mb}mb", ssr_mode=False, show_error=True,
                   app_kwargs={"middleware": middleware})
    if auth:
        options["auth"] = parse_auth(auth)
    return options


def serve(studio: Studio, queue_size: int = 16, concurrency: int = 8, **launch) -> gr.Blocks:
    # Several events at once, so that concurrent requests reach the Studio's batcher together (it runs one pass
    # at a time and merges those that share their settings).
    page = build(studio).queue(max_size=queue_size, default_concurrency_limit=concurrency, api_open=False)
    page.launch(**launch_options(studio, **launch), prevent_thread_lock=True, quiet=True)
    return page
