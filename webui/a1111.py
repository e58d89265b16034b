"""AUTOMATIC1111's HTTP API (/sdapi/v1/...) over a Studio, so its clients (webuiapi, chat front ends,
painting plugins, bots) drive sdlora: txt2img with <lora:name:w> tags, the LoRA, model, sampler and
option listings, progress, interrupt. Field names, defaults and error shapes are A1111's: a field
that cannot be read, or a value we cannot honour, is a 422 whose JSON `detail` names the field (as
FastAPI's own validation answers). Fields that would change the picture and that we do not support
(hires fix, refiner, scripts, face restoration, tiling, variation seeds, img2img) are refused with a
422 that says so; harmless ones are ignored and listed in `info` under "ignored".

Generation goes through Studio.pictures, so the API shares the page's limits, adapter loading and
request batching.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import random
import secrets
import time

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from sdlora.errors import SdloraError
from sdlora.schedulers import DEFAULT_SCHEDULER, SCHEDULERS
from sdlora.studio import Studio

# A1111's sampler names -> ours; its "scheduler" field picks Karras sigmas where we have them.
SAMPLERS = {"Euler": "euler", "Euler a": "euler_a", "DDIM": "ddim", "DDPM": "ddpm", "PLMS": "pndm", "LMS": "lms",
            "Heun": "heun", "DPM++ 2M": "dpm++2m", "DPM++ 2M Karras": "dpm++2m_karras", "UniPC": "unipc"}
ALIASES = {"Euler": ["k_euler"], "Euler a": ["k_euler_a", "k_euler_ancestral"], "DDIM": [], "DDPM": [],
           "PLMS": [], "LMS": ["k_lms"], "Heun": ["k_heun"], "DPM++ 2M": ["k_dpmpp_2m"],
           "DPM++ 2M Karras": ["k_dpmpp_2m_ka"], "UniPC": []}
SCHEDULE_TYPES = ("automatic", "karras", "")


class Txt2Img(BaseModel):
    """A1111's StableDiffusionTxt2ImgProcessingAPI: its field names and defaults. Unknown fields are
    accepted and ignored (listed in info), as A1111 accepts what its extensions add."""

    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str = "Euler"
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    enable_hr: bool = False
    refiner_checkpoint: str | None = None
    script_name: str | None = None
    script_args: list = []
    alwayson_scripts: dict = {}
    override_settings: dict | None = None
    send_images: bool = True
    save_images: bool = False


# Settings that override_settings may carry without changing the picture.
HARMLESS_OVERRIDES = {"samples_save", "samples_format", "save_images_add_number", "grid_save", "sd_model_checkpoint",
                      "CLIP_stop_at_last_layers", "eta_noise_seed_delta", "sd_vae"}


def unprocessable(field: str, message: str, value=None) -> JSONResponse:
    """FastAPI's validation answer, for a value we read but cannot honour: 422 {"detail": [{loc, msg, type}]}."""
    return JSONResponse({"detail": [{"type": "value_error", "loc": ["body", field], "msg": message,
                                     "input": value}]}, status_code=422)


class _Refused(Exception):
    def __init__(self, field: str, message: str, value=None):
        super().__init__(message)
        self.field, self.message, self.value = field, message, value


def sampler_of(req: Txt2Img) -> tuple[str, str]:
    """(our scheduler name, A1111's name for the infotext)."""
    name = req.sampler_name or req.sampler_index or "Euler"
    if name in SCHEDULERS:  # our own short names are accepted too
        return name, name
    found = next((a for a, aliases in ALIASES.items() if name == a or name in aliases), None)
    if found is None:
        raise _Refused("sampler_name", f"sampler {name!r} is not one this server has; GET /sdapi/v1/samplers "
                       "lists them", name)
    schedule = (req.scheduler or "automatic").lower()
    if schedule not in SCHEDULE_TYPES:
        raise _Refused("scheduler", f"schedule type {req.scheduler!r} is not supported; use Automatic or Karras",
                       req.scheduler)
    if schedule == "karras" and found != "DPM++ 2M Karras":
        found = f"{found} Karras"
        if found not in SAMPLERS:
            raise _Refused("scheduler", f"the Karras schedule is supported with DPM++ 2M only, not {name!r}",
                           req.scheduler)
    return SAMPLERS[found], found


def refused_fields(req: Txt2Img) -> list[str]:
    """Raise for a field set to something that changes A1111's picture and that we cannot do; return the
    names of the fields ignored (set, but harmless here)."""
    changing = [("enable_hr", req.enable_hr, "hires fix"), ("refiner_checkpoint", req.refiner_checkpoint, "a refiner"),
                ("script_name", req.script_name, "scripts"), ("script_args", req.script_args, "scripts"),
                ("restore_faces", req.restore_faces, "face restoration"), ("tiling", req.tiling, "tiling"),
                ("styles", req.styles, "saved prompt styles")]
    for field, value, what in changing:
        if value:
            raise _Refused(field, f"{what} is not supported by sdlora's A1111 API; leave {field} unset", value)
    if req.subseed_strength:
        raise _Refused("subseed_strength", "variation seeds are not supported; leave subseed_strength at 0",
                       req.subseed_strength)
    for field in ("seed_resize_from_h", "seed_resize_from_w"):
        if getattr(req, field) > 0:
            raise _Refused(field, "resizing the seed is not supported; leave it at -1 or 0", getattr(req, field))
    for script, value in (req.alwayson_scripts or {}).items():
        args = value.get("args", []) if isinstance(value, dict) else value
        if any(a not in (False, None, {}, []) for a in (args or [])):  # a disabled script sends [False] or []
            raise _Refused("alwayson_scripts", f"the script {script!r} is not supported; sdlora runs no A1111 "
                           "extensions", script)
    changing_overrides = sorted(set(req.override_settings or {}) - HARMLESS_OVERRIDES)
    if changing_overrides:
        raise _Refused("override_settings", f"the settings {changing_overrides} are not supported", changing_overrides)
    ignored = sorted(set(req.model_extra or {}))
    ignored += sorted(k for k in (req.override_settings or {}))
    return ignored


def infotext(prompt: str, negative: str, steps: int, sampler: str, cfg: float, seed: int, width: int, height: int,
             model: str) -> str:
    """A1111's `parameters` text: the prompt as given (tags kept), then its settings line."""
    lines = [prompt] + ([f"Negative prompt: {negative}"] if negative else [])
    lines.append(f"Steps: {steps}, Sampler: {sampler}, CFG scale: {cfg:g}, Seed: {seed}, Size: {width}x{height}, "
                 f"Model: {model}, Version: sdlora")
    return "\n".join(lines)


def _png_base64(image, text: str, sdlora_json: str) -> str:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", text)
    info.add_text("sdlora", sdlora_json)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def txt2img(studio: Studio, req: Txt2Img) -> dict:
    """The txt2img answer: images (base64 PNGs carrying `parameters`), the request's parameters, info."""
    ignored = refused_fields(req)
    scheduler, sampler_label = sampler_of(req)
    lim = studio.limits
    count = req.batch_size * req.n_iter
    if req.batch_size < 1 or req.n_iter < 1 or count > lim.max_images:
        raise _Refused("batch_size", f"batch_size x n_iter must be 1 to {lim.max_images}", count)
    for field in ("width", "height"):
        value = getattr(req, field)
        if not 8 <= value <= lim.max_side or value % 8:
            raise _Refused(field, f"{field} must be a multiple of 8 from 8 to {lim.max_side}", value)
    if not 1 <= req.steps <= lim.max_steps:
        raise _Refused("steps", f"steps must be 1 to {lim.max_steps}", req.steps)
    seed = random.randrange(2**32) if req.seed == -1 else req.seed
    if seed < 0:
        raise _Refused("seed", "seed must be -1 (random) or 0 and up", req.seed)
    from sdlora.batching import QueueFull

    try:
        results, described = studio.pictures(req.prompt, [], negative=req.negative_prompt, seed=seed, steps=req.steps,
                                              guidance=req.cfg_scale, width=req.width, height=req.height, num=count,
                                              scheduler=scheduler)
    except QueueFull:
        raise
    except SdloraError as err:
        field = "negative_prompt" if "negative" in str(err) else "cfg_scale" if "guidance" in str(err) else "prompt"
        raise _Refused(field, str(err), None) from None
    seeds = [r.seed for r in results]
    texts = [infotext(req.prompt, req.negative_prompt, req.steps, sampler_label, req.cfg_scale, s, req.width,
                      req.height, studio.base_spec) for s in seeds]
    if req.save_images:
        studio._save(results, described)
    images = [_png_base64(r.image, t, json.dumps({**r.metadata(), "adapters": described}, sort_keys=True))
              for r, t in zip(results, texts)] if req.send_images else []
    info = {"prompt": req.prompt, "all_prompts": [req.prompt] * count, "negative_prompt": req.negative_prompt,
            "all_negative_prompts": [req.negative_prompt] * count, "seed": seed, "all_seeds": seeds,
            "subseed": seed, "all_subseeds": seeds, "subseed_strength": 0, "width": req.width, "height": req.height,
            "sampler_name": sampler_label, "cfg_scale": req.cfg_scale, "steps": req.steps,
            "batch_size": req.batch_size, "restore_faces": False, "sd_model_name": studio.base_spec,
            "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": None,
            "extra_generation_params": {"Adapters": "; ".join(described)} if described else {},
            "index_of_first_image": 0, "infotexts": texts, "styles": [], "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
            "clip_skip": 1, "version": "sdlora", "ignored": ignored}
    return {"images": images, "parameters": req.model_dump(), "info": json.dumps(info)}


def basic_auth(credentials: str | None):
    """A dependency: HTTP basic against USER:PASS[,USER:PASS] (A1111's --api-auth); no credentials: open."""
    pairs = []
    for part in (credentials or "").split(","):
        user, sep, password = part.strip().partition(":")
        if part.strip():
            if not sep or not user or not password:
                raise SdloraError("--api-auth must be USER:PASS (or several, separated by commas)",
                                  "pass e.g. --api-auth me:a-long-password")
            pairs.append((user, password))

    def check(request: Request):
        if not pairs:
            return
        header = request.headers.get("authorization", "")
        scheme, _, encoded = header.partition(" ")
        try:
            user, _, password = base64.b64decode(encoded, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            user, password = "", ""
        ok = scheme.lower() == "basic" and any(secrets.compare_digest(user.encode(), u.encode()) &
                                                secrets.compare_digest(password.encode(), p.encode()) for u, p in pairs)
        if not ok:
            from fastapi import HTTPException

            raise HTTPException(401, "Incorrect username or password", headers={"WWW-Authenticate": "Basic"})

    return check


def router(studio: Studio, api_auth: str | None = None) -> APIRouter:
    """The /sdapi/v1 routes over `studio`."""
    api = APIRouter(prefix="/sdapi/v1", dependencies=[Depends(basic_auth(api_auth))])

    @api.post("/txt2img")
    def post_txt2img(req: Txt2Img):
        from sdlora.batching import QueueFull

        try:
            return txt2img(studio, req)
        except _Refused as err:
            return unprocessable(err.field, err.message, err.value)
        except QueueFull as err:
            return JSONResponse({"detail": str(err)}, status_code=503, headers={"Retry-After": "5"})

    @api.post("/img2img")
    def post_img2img():
        return unprocessable("init_images", "img2img is not supported by sdlora's A1111 API; use txt2img")

    @api.get("/loras")
    def get_loras():
        lib = studio.library
        return [{"name": n, "alias": n, "path": str(lib.path(n)), "metadata": lib.metadata(n)} for n in lib.names()]

    @api.post("/refresh-loras")
    def refresh_loras():
        studio.library.entries()  # the listing is read from the folder on every call; this re-reads its rows
        return {}

    @api.get("/sd-models")
    def sd_models():
        return [{"title": studio.base_spec, "model_name": studio.base_spec, "hash": None, "sha256": None,
                 "filename": str(studio.base.source), "config": None}]

    @api.get("/samplers")
    def samplers():
        return [{"name": a, "aliases": ALIASES[a] + [SAMPLERS[a]], "options": {}} for a in SAMPLERS]

    @api.get("/schedulers")
    def schedulers():
        return [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1,
                 "need_inner_model": False},
                {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0, "need_inner_model": False}]

    @api.get("/scripts")
    def scripts():
        return {"txt2img": [], "img2img": []}

    @api.get("/options")
    def options():
        return {"sd_model_checkpoint": studio.base_spec, "samples_format": "png", "CLIP_stop_at_last_layers": 1,
                "sd_vae": "Automatic", "default_sampler": "Euler" if DEFAULT_SCHEDULER == "euler" else DEFAULT_SCHEDULER}

    @api.get("/progress")
    def progress(skip_current_image: bool = False):
        p = studio.batcher.progress
        fraction = p.fraction()
        elapsed = time.time() - p.started if p.sampling_steps else 0.0
        eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
        return {"progress": fraction, "eta_relative": eta,
                "state": {"skipped": False, "interrupted": p.interrupted, "stopping_generation": False, "job": p.job,
                          "job_count": p.job_count, "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "job_no": 0,
                          "sampling_step": p.sampling_step, "sampling_steps": p.sampling_steps},
                "current_image": None, "textinfo": None, "current_task": None}

    @api.post("/interrupt")
    def interrupt():
        studio.batcher.interrupt()
        return {}

    return api


def api_app(studio: Studio, api_auth: str | None = None) -> FastAPI:
    """A FastAPI app holding only the A1111 routes (the page mounts it under /sdapi; `sdlora serve` runs it)."""
    app = FastAPI(title="sdlora A1111 API", docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(router(studio, api_auth))
    return app


class MountApi:
    """ASGI middleware in front of the page: /sdapi/... goes to the API app, everything else to the page. Gradio
    builds its own app inside launch(), so routes cannot be added to it beforehand; a middleware can."""

    def __init__(self, app, api=None):
        self.app, self.api = app, api

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("path", "").startswith("/sdapi/"):
            await self.api(scope, receive, send)
            return
        await self.app(scope, receive, send)


class ApiServer:
    """`sdlora serve`: the API alone on uvicorn, in a background thread, behind the page's Host/Origin check."""

    def __init__(self, studio: Studio, host: str = "127.0.0.1", port: int = 7861, api_auth: str | None = None,
                 extra_hosts: tuple[str, ...] = ()):
        import threading

        import uvicorn

        from .app import SameOriginOnly, allowed_hosts

        app = SameOriginOnly(api_app(studio, api_auth), hosts=allowed_hosts(host, extra_hosts))
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))
        self.url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"
        self.thread = threading.Thread(target=self.server.run, name="sdlora-api", daemon=True)
        self.thread.start()
        for _ in range(200):  # up to 10 s for the socket
            if self.server.started or not self.thread.is_alive():
                break
            time.sleep(0.05)
        if not self.server.started:
            raise SdloraError(f"the API server could not start on {host}:{port}", "is the port in use? pass --port")

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
