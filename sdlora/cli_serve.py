"""`sdlora webui` (the page, and with --api A1111's HTTP API beside it) and `sdlora serve` (the API alone)."""

from __future__ import annotations

import argparse
import sys

from .cli_common import add_base_flags, pick_device
from .errors import SdloraError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _studio(args):
    from .library import AdapterLibrary
    from .pipelines import load_base
    from .studio import Studio

    base = load_base(args.base, device=pick_device(args.device), config=args.base_config)
    if args.quant != "none":
        base.quantize(args.quant)
    return Studio(base, AdapterLibrary(args.library), args.outputs, getattr(args, "data_root", None),
                  base_spec=args.base, batch_window_ms=args.batch_window_ms, max_batch=args.max_batch,
                  max_queue=args.max_queue)


def _extra_hosts(args) -> tuple[str, ...]:
    return tuple(h for h in args.allowed_hosts.split(",") if h.strip())


def _check_api_auth(args, what: str) -> None:
    """Before the base loads (a typo costs no waiting); a warning where the API is open to other machines."""
    from webui.a1111 import basic_auth

    basic_auth(args.api_auth)
    if args.host not in LOOPBACK and not args.api_auth:
        print(f"sdlora: warning: {what} is reachable from other machines on {args.host} without a password; "
              "pass --api-auth USER:PASS", file=sys.stderr)


def _wait_forever(closable) -> int:
    import time

    try:
        while True:
            time.sleep(3600)
    finally:
        closable.close()


def _import_webui():
    try:
        import webui.a1111  # noqa: F401
        import webui.app  # noqa: F401
    except ImportError as err:
        raise SdloraError(f"the web UI is not importable ({err})", "run from the repository or reinstall sdlora") from err


def cmd_webui(args) -> int:
    _import_webui()
    from webui.app import parse_auth, serve

    if args.auth:
        parse_auth(args.auth)  # before the base loads: a typo costs no waiting
    if args.host not in LOOPBACK and not args.auth:
        print(f"sdlora: warning: the page is reachable from other machines on {args.host} without a password; "
              "pass --auth USER:PASS", file=sys.stderr)
    if args.api:
        _check_api_auth(args, "the A1111 API (--api)")
    studio = _studio(args)
    page = serve(studio, host=args.host, port=args.port, auth=args.auth, share=args.share,
                 extra_hosts=_extra_hosts(args), api=args.api, api_auth=args.api_auth)
    api = f", A1111 API at {page.local_url.rstrip('/')}/sdapi/v1" if args.api else ""
    print(f"sdlora: serving {page.local_url}{api} (library {studio.library.folder}, outputs {studio.outputs})",
          file=sys.stderr)
    return _wait_forever(page)


def cmd_serve(args) -> int:
    _import_webui()
    from webui.a1111 import ApiServer

    _check_api_auth(args, "the A1111 API")
    studio = _studio(args)
    server = ApiServer(studio, host=args.host, port=args.port, api_auth=args.api_auth,
                       extra_hosts=_extra_hosts(args))
    print(f"sdlora: A1111 API at {server.url}/sdapi/v1 (library {studio.library.folder})", file=sys.stderr)
    return _wait_forever(server)


def _common_flags(p: argparse.ArgumentParser, port: int) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=port)
    p.add_argument("--allowed-hosts", default="", metavar="NAME,NAME", help="host names answered besides "
                   "localhost, 127.0.0.1, ::1 and --host; any other Host is refused (DNS rebinding)")
    p.add_argument("--api-auth", metavar="USER:PASS[,USER:PASS]", default=None,
                   help="HTTP basic credentials for the A1111 API (as A1111's --api-auth; the page's --auth is not "
                        "the API's)")
    p.add_argument("--library", default="adapters", metavar="DIR", help="the adapter library folder (default adapters)")
    p.add_argument("--outputs", default="out/webui", metavar="DIR", help="where pictures (save_images) and runs go")
    p.add_argument("--batch-window-ms", type=float, default=50.0, metavar="MS",
                   help="how long a request waits for others sharing its size, steps, sampler and guidance, to run "
                        "in one pass with a mix per picture (default 50)")
    p.add_argument("--max-batch", type=int, default=8, metavar="N", help="most pictures in one pass (default 8)")
    p.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="most requests waiting; beyond it the API answers 503 and the page says so (default 64)")
    add_base_flags(p)


def add_serve_parsers(sub) -> None:
    w = sub.add_parser("webui", help="serve the Gradio page: generate with a mix, train, manage the library",
                       description="Serve the web page on HOST:PORT (127.0.0.1 by default: this machine only).")
    _common_flags(w, 7860)
    w.add_argument("--auth", metavar="USER:PASS", default=None, help="ask for this user and password")
    w.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    w.add_argument("--data-root", default=None, metavar="DIR", help="folder whose subfolders are training datasets")
    w.add_argument("--api", action="store_true", help="also serve AUTOMATIC1111's HTTP API under /sdapi/v1")
    w.set_defaults(func=cmd_webui)

    s = sub.add_parser("serve", help="serve AUTOMATIC1111's HTTP API alone (/sdapi/v1/txt2img, loras, ...)",
                       description="Serve A1111's API on HOST:PORT (127.0.0.1 by default) for its clients: webuiapi, "
                                   "chat front ends, painting plugins. <lora:name:w> tags pick library adapters.")
    _common_flags(s, 7861)
    s.set_defaults(func=cmd_serve)
