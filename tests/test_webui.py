"""The web page, driven as its users drive it: gradio_client for every function, a real server."""

import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdlora.errors import SdloraError

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_adapter(base, path: Path, seed: int, trigger: str):
    from sdlora.adapter_io import save_adapter
    from sdlora.adapters import AdapterConfig
    from sdlora.inject import adapter_layers
    from tests.core_helpers import randomize

    base.add_adapter(path.stem, AdapterConfig(rank=4, alpha=4, seed=seed), targets="attn", text_encoder=True)
    for model in base.models().values():
        randomize(adapter_layers(model), path.stem, seed=seed, std=0.1)
    return save_adapter(base, path.stem, path, "sdlora", trigger_words=[trigger])


def two_adapter_library(root: Path) -> Path:
    """root/library with style-a and style-b: random rank-4 attention adapters (UNet and text encoder)."""
    from sdlora.pipelines import load_base

    maker = load_base("embedded")
    for seed, name in ((1, "style-a"), (2, "style-b")):
        _make_adapter(maker, root / "library" / f"{name}.safetensors", seed, name.replace("-", ""))
    return root / "library"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A running page over its own embedded base, a library of two adapters and a data root."""
    from gradio_client import Client

    from sdlora.library import AdapterLibrary
    from sdlora.pipelines import load_base
    from sdlora.studio import Limits, Studio
    from webui.app import serve

    root = tmp_path_factory.mktemp("site")
    two_adapter_library(root)
    data = root / "data" / "dots"
    data.mkdir(parents=True)
    styles = Path(__file__).resolve().parents[1] / "samples" / "styles" / "dots"
    for p in sorted(styles.iterdir())[:16]:
        (data / p.name).write_bytes(p.read_bytes())
    (root / "secret.txt").write_text("not for the page")
    studio = Studio(load_base("embedded"), AdapterLibrary(root / "library"), root / "outputs", root / "data",
                    limits=Limits(max_upload_mb=1))
    port = _free_port()
    page = serve(studio, port=port)
    client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=str(root / "downloads"))
    yield {"url": f"http://127.0.0.1:{port}", "studio": studio, "client": client, "root": root, "page": page}
    page.close()


def slots(*rows):
    """The mixer's 4 rows, flat: (name, unet, te, on, blocks, steps) each; missing rows empty."""
    flat = []
    for i in range(4):
        name, unet, te = rows[i] if i < len(rows) else (None, 1.0, 1.0)
        flat += [name, unet, te, True, "", ""]
    return flat


def settings(prompt="a red circle", seed=3, steps=6, num=1):
    # prompt, negative, seed, steps, guidance, width, height, scheduler, num
    return [prompt, "", seed, steps, 5.0, 64, 64, "euler", num]


def pixels(item) -> np.ndarray:
    path = item["image"] if isinstance(item, dict) and "image" in item else item
    path = path["path"] if isinstance(path, dict) else path
    return np.asarray(Image.open(path).convert("RGB"))


def test_library_listing_and_names_are_checked(site):
    lib = site["studio"].library
    assert lib.names() == ["style-a", "style-b"]
    for bad in ("../secret", "../../etc/passwd", "style-a/../style-b", str(site["root"] / "library" / "style-a")):
        with pytest.raises(SdloraError, match="no adapter named"):
            lib.path(bad)


def test_prompt_tags_follow_a1111():
    from sdlora.prompt_tags import parse_prompt_tags

    clean, tags = parse_prompt_tags("a red circle, <lora:style-a:0.8> <lora:style-b:0.5:1.5>")
    assert clean == "a red circle"
    assert (tags["style-a"].text_encoder, tags["style-a"].unet) == (0.8, 0.8)
    assert (tags["style-b"].text_encoder, tags["style-b"].unet) == (0.5, 1.5)  # A1111: te first, then unet
    assert parse_prompt_tags("<lora:x:unet=0.3:te=0>")[1]["x"].unet == 0.3
    for bad in ("<lora:x:nan>", "<lora:x:1:2:3>", "<lora:x:a=1>", "<lora:x> <lora:x>"):
        with pytest.raises(SdloraError):
            parse_prompt_tags(bad)


def test_generate_through_the_page_matches_the_library_and_tags_equal_sliders(site):
    from sdlora.generate import GenerateSettings, generate
    from sdlora.mixing import Mix

    client, studio = site["client"], site["studio"]
    with_slider = client.predict(*settings(), *slots(("style-a", 0.7, 0.4)), api_name="/generate")
    with_tag = client.predict(*settings("a red circle <lora:style-a:0.4:0.7>"), *slots(), api_name="/generate")
    plain = client.predict(*settings(), *slots(), api_name="/generate")
    assert np.array_equal(pixels(with_slider[0]), pixels(with_tag[0]))
    assert not np.array_equal(pixels(with_slider[0]), pixels(plain[0]))
    # the same picture as the library makes directly, and its settings are in the PNG
    internal = studio._ensure_loaded(["style-a"])["style-a"]
    from sdlora.mixing import AdapterWeights

    direct = generate(studio.base, GenerateSettings(prompts=("a red circle",), seed=3, steps=6, scheduler="euler"),
                      progress=False, mix=Mix({internal: AdapterWeights(unet=0.7, text_encoder=0.4)}))
    assert np.array_equal(pixels(with_slider[0]), np.asarray(direct[0].image))
    saved = Image.open(with_slider[0]["image"]["path"] if isinstance(with_slider[0]["image"], dict)
                       else with_slider[0]["image"])
    assert "Seed: 3" in saved.info["parameters"] and "style-a: unet 0.7, text encoder 0.4" in saved.info["sdlora"]
    assert "style-a: unet 0.7" in with_slider[0]["caption"]


def test_dice_library_inspect_and_xy_grid(site):
    client = site["client"]
    seeds = {client.predict(api_name="/dice") for _ in range(3)}
    assert len(seeds) >= 2 and all(0 <= s < 2**32 for s in seeds)
    listing = client.predict(api_name="/library")
    assert [row[0] for row in listing[0]["data"]] == ["style-a", "style-b"]
    details = client.predict("style-a", api_name="/inspect")
    assert '"trigger_words": [\n    "stylea"\n  ]' in details and str(site["root"]) not in details
    grid = client.predict("style-a", "0, 1", "style-b", "0, 0.5, 1", *settings(), *slots(), api_name="/xy_grid")
    img = Image.open(grid)
    assert img.width > 2 * 64 and img.height > 3 * 64


def test_xy_grid_cells_equal_single_pictures(site):
    """Each cell of the grid (one batched pass per row, a mix per sample) is the picture made alone."""
    from sdlora.generate import GenerateSettings, generate
    from sdlora.mixing import Mix

    studio = site["studio"]
    internal = studio._ensure_loaded(["style-a", "style-b"])
    s = GenerateSettings(prompts=("a red circle",), seed=3, steps=6, scheduler="euler", num=2, same_seed=True)
    row = generate(studio.base, s, progress=False, mix=[Mix({internal["style-a"]: wa, internal["style-b"]: 0.5})
                                                        for wa in (0.0, 1.0)])
    for wa, got in zip((0.0, 1.0), row):
        alone = generate(studio.base, GenerateSettings(prompts=("a red circle",), seed=3, steps=6, scheduler="euler"),
                         progress=False, mix=Mix({internal["style-a"]: wa, internal["style-b"]: 0.5}))[0]
        diff = np.abs(np.asarray(got.image, dtype=np.int16) - np.asarray(alone.image, dtype=np.int16))
        assert diff.max() <= 1, diff.max()


def test_a_library_file_changed_after_use_gives_the_new_file_pictures(tmp_path):
    """The page loads a library file once and keeps it; a file rewritten later (retrained, replaced) must
    be loaded again under the same name, with nothing of the old one left in the layers or the record."""
    import os

    from sdlora.library import AdapterLibrary
    from sdlora.pipelines import load_base
    from sdlora.studio import Slot, Studio

    def picture(studio):
        path, _ = studio.generate("a red circle", [Slot("style", 1.0, 1.0)], seed=3, steps=6, scheduler="euler")[0]
        return np.asarray(Image.open(path).convert("RGB"))

    library = tmp_path / "library"
    maker = load_base("embedded")
    _make_adapter(maker, library / "style.safetensors", 1, "stylea")
    studio = Studio(load_base("embedded"), AdapterLibrary(library), tmp_path / "out")
    old = picture(studio)
    maker.remove_adapter("style")
    _make_adapter(maker, library / "style.safetensors", 2, "styleb")
    later = os.stat(library / "style.safetensors").st_mtime + 10
    os.utime(library / "style.safetensors", (later, later))  # a file system with coarse mtimes still sees a change
    new = picture(studio)
    fresh = picture(Studio(load_base("embedded"), AdapterLibrary(library), tmp_path / "out-fresh"))
    assert np.array_equal(new, fresh) and not np.array_equal(new, old)
    assert len(studio.base.adapter_info) == 1 and len(studio.base.mixer.loaded()) == 1


def test_the_base_replaces_a_loaded_adapter_with_a_changed_file_only_if_the_new_file_is_good(tmp_path):
    from sdlora.generate import GenerateSettings, generate
    from sdlora.mixing import Mix
    from sdlora.pipelines import load_base

    def picture(base):
        s = GenerateSettings(prompts=("a red circle",), steps=6, seed=3)
        return np.asarray(generate(base, s, progress=False, mix=Mix({"style": 1.0}))[0].image)

    maker, path = load_base("embedded"), tmp_path / "style.safetensors"
    _make_adapter(maker, path, 1, "stylea")
    base = load_base("embedded")
    base.load_adapter(path, "style")
    old = picture(base)
    maker.remove_adapter("style")
    _make_adapter(maker, path, 2, "styleb")
    fresh = load_base("embedded")
    fresh.load_adapter(path, "style")
    layers = base.load_adapter(path, "style", replace=True).layers
    assert np.array_equal(picture(base), picture(fresh)) and not np.array_equal(picture(base), old)
    assert list(base.adapter_info) == ["style"] and base.mixer.loaded() == {"style"}
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SdloraError, match="bad.safetensors"):
        base.load_adapter(tmp_path / "bad.safetensors", "style", replace=True)
    assert np.array_equal(picture(base), picture(fresh)) and base.remove_adapter("style") == layers


def test_removing_an_adapter_clears_layers_and_record_so_the_name_loads_again(tmp_path):
    from sdlora.adapter_io import load_adapter
    from sdlora.pipelines import load_base

    maker = load_base("embedded")
    path = _make_adapter(maker, tmp_path / "style.safetensors", 1, "stylea")
    base = load_base("embedded")
    layers = load_adapter(base, path, "style").layers
    with pytest.raises(SdloraError, match="already loaded"):
        load_adapter(base, path, "style")
    assert base.remove_adapter("style") == layers
    assert "style" not in base.adapter_info and "style" not in base.mixer.loaded()
    with pytest.raises(SdloraError, match="no adapter named 'style' is loaded"):
        base.remove_adapter("style")
    assert load_adapter(base, path, "style").layers == layers


def test_export_merge_rename_delete(site):
    client, lib = site["client"], site["studio"].library
    assert "exported as style-a-kohya" in client.predict("style-a", "kohya", api_name="/export")
    assert "merged into mixed" in client.predict(["style-a", "style-b"], "0.5, 0.5", "mixed", api_name="/merge")
    assert "renamed to mixed2" in client.predict("mixed", "mixed2", api_name="/rename")
    with pytest.raises(Exception, match="type the name"):
        client.predict("mixed2", "oops", api_name="/delete")
    assert "mixed2" in lib.names()
    assert "deleted mixed2" in client.predict("mixed2", "mixed2", api_name="/delete")
    assert "deleted style-a-kohya" in client.predict("style-a-kohya", "style-a-kohya", api_name="/delete")
    assert lib.names() == ["style-a", "style-b"]
    with pytest.raises(Exception, match="already has an adapter named 'style-b'"):
        client.predict("style-a", "style-b", api_name="/rename")
    with pytest.raises(Exception, match="merge weights must lie within"):  # as the mixer's: no inf into the library
        client.predict(["style-a", "style-b"], "1e308, 1", "huge", api_name="/merge")
    assert lib.names() == ["style-a", "style-b"]


def test_upload_a_dataset_then_train_stop_and_find_it_in_the_library(site):
    from gradio_client import handle_file

    client, studio = site["client"], site["studio"]
    styles = Path(__file__).resolve().parents[1] / "samples" / "styles" / "mosaic"
    files = [handle_file(str(p)) for p in sorted(styles.iterdir())[:12]]
    client.predict(files, "mosaic-upload", api_name="/add_dataset")
    assert "mosaic-upload" in studio.datasets()
    assert len(list((studio.data_root / "mosaic-upload").glob("*.png"))) == 6

    status = client.predict("mosaic-upload", "trained", "lora", 2, 6, 1e-3, "", "nf4", "a red circle, zmosaic",
                            api_name="/train_start")
    assert status.startswith("starting") or status.startswith("running")
    deadline = time.time() + 300
    while time.time() < deadline:
        text, percent, losses, samples = client.predict(api_name="/train_status")
        if text.startswith(("done", "failed")):
            break
        time.sleep(0.5)
    assert text.startswith("done") and "in the library as trained" in text, text
    assert percent == 100 and len(losses["data"]) == 6 and samples
    assert "trained" in studio.library.names()

    # a long run, stopped: the adapter of the steps done joins the library
    client.predict("mosaic-upload", "stopped", "lora", 2, 5000, 1e-3, "", "nf4", "", api_name="/train_start")
    deadline = time.time() + 300
    while studio.job().step < 2:
        assert studio.job().status in ("starting", "running") and time.time() < deadline, studio.job()
        time.sleep(0.1)
    client.predict(api_name="/train_stop")
    studio.job().thread.join(120)
    assert studio.job().status == "stopped" and 2 <= studio.job().step < 5000
    assert "stopped" in studio.library.names()


def test_concurrent_clients_with_different_mixes_get_their_own_pictures(site):
    from gradio_client import Client

    mixes = [slots(), slots(("style-a", 1.0, 1.0)), slots(("style-b", 0.8, 0.2)),
             slots(("style-a", -0.5, 0.5), ("style-b", 1.0, 1.0))]
    serial = [pixels(site["client"].predict(*settings(seed=5), *m, api_name="/generate")[0]) for m in mixes]
    assert len({a.tobytes() for a in serial}) == 4  # four different pictures
    results: dict[int, np.ndarray] = {}
    errors = []

    def user(i):
        try:
            c = Client(site["url"] + "/", verbose=False, download_files=str(site["root"] / f"dl{i}"))
            results[i] = pixels(c.predict(*settings(seed=5), *mixes[i % 4], api_name="/generate")[0])
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=user, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors and len(results) == 8
    for i, got in results.items():  # batched by the Studio (two clients per mix): exactly its serial picture
        assert np.array_equal(got, serial[i % 4]), f"client {i}: {(got != serial[i % 4]).sum()} values differ"


def test_refused_requests(site):
    import httpx
    from gradio_client import handle_file

    client, url, root = site["client"], site["url"], site["root"]
    with pytest.raises(Exception, match="no adapter named '../secret'"):
        client.predict(*settings(), *slots(("../secret", 1.0, 1.0)), api_name="/generate")
    with pytest.raises(Exception, match="no adapter named"):
        client.predict("../../library/style-a", api_name="/inspect")
    with pytest.raises(Exception, match="must be a number from -100 to 100"):
        client.predict(*settings("a red circle <lora:style-a:nan>"), *slots(), api_name="/generate")
    with pytest.raises(Exception, match="outside"):
        client.predict(*settings("a red circle <lora:style-a:100>"), *slots(), api_name="/generate")
    with pytest.raises(Exception, match="characters"):
        client.predict(*settings("a red circle " * 200), *slots(), api_name="/generate")
    # files: only the outputs and the library are served
    made = client.predict(*settings(), *slots(), api_name="/generate")[0]["image"]
    made = made["path"] if isinstance(made, dict) else made
    inside = sorted((site["studio"].outputs).rglob("*.png"))[0]
    assert httpx.get(f"{url}/gradio_api/file={inside}").status_code == 200
    for outside in (root / "secret.txt", Path("/etc/passwd"), inside.parent / ".." / ".." / "secret.txt"):
        r = httpx.get(f"{url}/gradio_api/file={outside}")
        assert r.status_code in (403, 404) and "not for the page" not in r.text, (outside, r.status_code)
    # a page on another origin may not drive this one from a visitor's browser
    join = {"data": [], "fn_index": 0, "session_hash": "x"}
    for origin in ("http://evil.example", "null", "http://127.0.0.1.evil.example"):
        r = httpx.post(f"{url}/gradio_api/queue/join", headers={"Origin": origin}, json=join)
        assert r.status_code == 403 and "refused" in r.text, (origin, r.status_code)
    assert httpx.post(f"{url}/gradio_api/queue/join", headers={"Origin": url}, json=join).status_code == 200
    # DNS rebinding: a page whose own name resolves to 127.0.0.1 sends Host and Origin both naming it
    port = url.rsplit(":", 1)[1]
    rebound = {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"}
    r = httpx.post(f"{url}/gradio_api/queue/join", headers=rebound, json=join)
    assert r.status_code == 403 and "not one this server was started for" in r.text, r.status_code
    assert httpx.get(f"{url}/", headers={"Host": f"evil.example:{port}"}).status_code == 403
    assert httpx.get(f"http://localhost:{port}/").status_code == 200
    assert httpx.get(f"{url}/monitoring").status_code in (403, 404)  # Gradio's monitoring page is off
    # uploads over the cap are refused before they are stored
    big = root / "big.png"
    big.write_bytes(os.urandom(2 * 2**20))
    with pytest.raises(Exception, match="exceeds the maximum file size of 1048576 bytes"):
        client.predict([handle_file(str(big))], "too-big", api_name="/add_dataset")
    assert "too-big" not in site["studio"].datasets()
    assert site["page"]._queue.max_size == 16  # waiting requests are capped too


CHROMIUM = "/usr/bin/chromium"


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (.ci/run installs it)")
def test_a_real_browser_mixes_two_adapters_and_the_picture_changes(site, tmp_path):
    import httpx
    from playwright.sync_api import sync_playwright

    url = site["url"]
    flags = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=flags)
        page = browser.new_page(viewport={"width": 1280, "height": 1400})
        page.goto(url + "/")
        page.locator("#prompt textarea").fill("a red circle")

        def generate_and_fetch(previous: str | None) -> tuple[str, np.ndarray]:
            page.locator("#generate").click()
            page.wait_for_function(
                "prev => { const i = document.querySelector('#gallery img'); return i && i.src && i.src !== prev; }",
                arg=previous, timeout=120_000)
            src = page.locator("#gallery img").first.get_attribute("src")
            data = httpx.get(src if src.startswith("http") else url + src).content
            (tmp_path / "shown.png").write_bytes(data)
            return src, np.asarray(Image.open(tmp_path / "shown.png").convert("RGB"))

        src, plain = generate_and_fetch(None)
        for slot, name, unet in ((0, "style-a", "0.8"), (1, "style-b", "1.5")):
            box = page.locator(f"#slot{slot}-name input")
            box.click()
            box.fill(name)
            page.keyboard.press("Enter")
            weight = page.locator(f"#slot{slot}-unet input[type=number]")
            weight.fill(unet)
            weight.press("Enter")
        src2, mixed = generate_and_fetch(src)
        page.screenshot(path=str(tmp_path / "webui.png"), full_page=True)
        if os.environ.get("SDLORA_README_SCREENSHOT"):
            page.screenshot(path=os.environ["SDLORA_README_SCREENSHOT"], full_page=False)
        browser.close()
    assert plain.shape == mixed.shape == (64, 64, 3)
    assert np.abs(plain.astype(int) - mixed.astype(int)).mean() > 2.0, "the adapters did not change the picture"
    # the sliders reached the server: the page's defaults (seed 0, 20 steps, guidance 5, 64x64, euler)
    # with both adapters at the weights set give the same pixels through the API
    same = site["client"].predict("a red circle", "", 0, 20, 5.0, 64, 64, "euler", 1,
                                  *slots(("style-a", 0.8, 1.0), ("style-b", 1.5, 1.0)), api_name="/generate")
    assert np.array_equal(pixels(same[0]), mixed)
    assert (tmp_path / "webui.png").stat().st_size > 10_000


def test_the_webui_command_serves_locally_asks_for_auth_and_warns(tmp_path):
    import subprocess
    import sys

    import httpx

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    common = ["--library", str(tmp_path / "lib"), "--outputs", str(tmp_path / "out")]
    bad = subprocess.run([sys.executable, "-m", "sdlora", "webui", "--auth", "nopassword", *common],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "--auth must be USER:PASS" in bad.stderr

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sdlora", "webui", "--host", "0.0.0.0", "--port", str(port),
                             "--auth", "me:secret-words", *common], stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 120
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/config", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.time() < deadline, "the server did not start"
                time.sleep(0.5)
        assert r.status_code == 401  # the page's config needs the login
        login = httpx.post(f"http://127.0.0.1:{port}/login", data={"username": "me", "password": "secret-words"})
        assert login.status_code == 200
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "without a password" not in err  # --auth given: no warning

    proc = subprocess.Popen([sys.executable, "-m", "sdlora", "webui", "--host", "0.0.0.0", "--port", str(_free_port()),
                             *common], stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines, deadline = [], time.time() + 120
        while not any("serving" in line for line in lines) and proc.poll() is None and time.time() < deadline:
            lines.append(proc.stderr.readline())  # the warning comes before the server starts
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    assert any("reachable from other machines on 0.0.0.0 without a password; pass --auth USER:PASS" in line
               for line in lines), lines


def test_library_rows_are_read_once_per_file_version(tmp_path, monkeypatch):
    from sdlora.library import AdapterLibrary
    from sdlora.pipelines import load_base

    lib = AdapterLibrary(tmp_path / "lib")
    _make_adapter(load_base("embedded"), lib.folder / "x.safetensors", 1, "x")
    reads = []
    real = AdapterLibrary._entry
    monkeypatch.setattr(AdapterLibrary, "_entry", staticmethod(lambda n, p: reads.append(n) or real(n, p)))
    first = lib.entries()
    assert lib.entries() == first and reads == ["x"]  # the second listing reads no file
    (lib.folder / "x.safetensors").write_bytes(b"broken")  # a new version of the file is read again
    assert lib.entries()[0].format == "unreadable" and reads == ["x", "x"]


def test_host_allow_list_takes_the_bound_address_and_allowed_hosts():
    """The middleware alone, on a bare ASGI app: loopback names, --host and --allowed-hosts pass, others 403."""
    import asyncio

    import httpx

    from webui.app import SameOriginOnly, allowed_hosts

    async def ok(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    app = SameOriginOnly(ok, allowed_hosts("192.168.1.5", ("studio.lan",)))

    async def status(host, origin=None):
        headers = {"Host": host, **({"Origin": origin} if origin else {})}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x") as c:
            return (await c.get("/", headers=headers)).status_code

    for host in ("127.0.0.1:7860", "localhost:7860", "[::1]:7860", "192.168.1.5:7860", "studio.lan:7860"):
        assert asyncio.run(status(host)) == 200, host
    for host in ("evil.example:7860", "studio.lan.evil.example"):
        assert asyncio.run(status(host, f"http://{host}")) == 403, host
    assert asyncio.run(status("studio.lan:7860", "http://evil.example")) == 403  # the Origin check still holds
    assert "0.0.0.0" not in allowed_hosts("0.0.0.0")  # a wildcard bind allows no name by itself
