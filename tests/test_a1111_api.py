"""A1111's HTTP API, driven by the third-party `webuiapi` client (PyPI), as its users drive A1111."""

import base64
import io
import json
import subprocess
import sys
import threading

import numpy as np
import pytest
import requests
from PIL import Image

webuiapi = pytest.importorskip("webuiapi")

USER, PASSWORD = "painter", "a-long-password"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`sdlora serve` in-process, with --api-auth, over a library of two random adapters."""
    from sdlora.library import AdapterLibrary
    from sdlora.pipelines import load_base
    from sdlora.studio import Studio
    from tests.test_webui import _free_port, two_adapter_library
    from webui.a1111 import ApiServer

    root = tmp_path_factory.mktemp("api")
    studio = Studio(load_base("embedded"), AdapterLibrary(two_adapter_library(root)), root / "outputs",
                    batch_window_ms=200, max_batch=8)
    srv = ApiServer(studio, port=_free_port(), api_auth=f"{USER}:{PASSWORD}")
    yield {"studio": studio, "url": srv.url, "root": root,
           "api": webuiapi.WebUIApi(baseurl=f"{srv.url}/sdapi/v1", username=USER, password=PASSWORD)}
    srv.close()


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def test_txt2img_with_two_lora_tags_gives_the_pixels_of_sdlora_generate(server, tmp_path):
    result = server["api"].txt2img(prompt="a red circle <lora:style-a:0.8> <lora:style-b:0.5:1.2>",
                                   negative_prompt="blurry", seed=7, steps=6, cfg_scale=5, width=64, height=64,
                                   sampler_name="Euler a", batch_size=2)
    assert len(result.images) == 2 and result.info["all_seeds"] == [7, 8]
    assert result.info["infotexts"][1].startswith("a red circle <lora:style-a:0.8>")
    assert "Seed: 8" in result.info["infotexts"][1] and "Sampler: Euler a" in result.info["infotexts"][1]
    assert result.images[0].info["parameters"] == result.info["infotexts"][0]  # the PNG carries A1111's text
    lib = server["root"] / "library"
    out = tmp_path / "cli.png"
    # A1111's <lora:name:te:unet>; sdlora generate's FILE:UNET:TE
    subprocess.run([sys.executable, "-m", "sdlora", "generate", "a red circle", "--negative", "blurry",
                    "--seed", "7", "--num", "2", "--steps", "6", "--guidance", "5", "--size", "64x64",
                    "--scheduler", "euler_a", "--adapter", f"{lib / 'style-a.safetensors'}:0.8:0.8",
                    "--adapter", f"{lib / 'style-b.safetensors'}:1.2:0.5", "--out", str(out), "--quiet"],
                   check=True, capture_output=True)
    for k in range(2):
        cli = pixels(Image.open(tmp_path / f"cli-00-0{k}.png"))
        assert np.array_equal(pixels(result.images[k]), cli), f"picture {k} differs from sdlora generate's"
    plain = server["api"].txt2img(prompt="a red circle", negative_prompt="blurry", seed=7, steps=6, cfg_scale=5,
                                  width=64, height=64, sampler_name="Euler a")
    assert not np.array_equal(pixels(plain.image), pixels(result.images[0]))


def test_listings_name_what_the_library_and_the_server_hold(server):
    api = server["api"]
    loras = api.get_loras()
    assert sorted(entry["name"] for entry in loras) == ["style-a", "style-b"]
    assert all(entry["path"].endswith(f"{entry['name']}.safetensors") for entry in loras)
    assert all(isinstance(entry["metadata"], dict) and entry["metadata"] for entry in loras)
    names = [s["name"] for s in api.get_samplers()]
    assert {"Euler", "Euler a", "DDIM", "DPM++ 2M"} <= set(names)
    assert api.get_sd_models()[0]["model_name"] == "embedded"
    assert api.get_options()["sd_model_checkpoint"] == "embedded"
    assert set(api.get_progress()["state"]) >= {"sampling_step", "sampling_steps", "job_count"}
    assert api.session.post(f"{server['url']}/sdapi/v1/refresh-loras").status_code == 200


def test_without_credentials_the_api_refuses(server):
    anonymous = webuiapi.WebUIApi(baseurl=f"{server['url']}/sdapi/v1")
    with pytest.raises(RuntimeError, match="401"):
        anonymous.txt2img(prompt="a red circle", steps=2, width=64, height=64)
    wrong = requests.get(f"{server['url']}/sdapi/v1/loras", auth=(USER, "not-the-password"))
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Basic"


def test_a_bad_field_gets_a1111s_422_shape(server):
    url, auth = f"{server['url']}/sdapi/v1/txt2img", (USER, PASSWORD)
    cases = {"steps": {"steps": "many"},  # not a number: FastAPI's own validation, as A1111's
             "width": {"width": 100},  # not a multiple of 8
             "sampler_name": {"sampler_name": "Nonexistent"},
             "enable_hr": {"enable_hr": True},  # hires fix would change the picture: refused, not ignored
             "prompt": {"prompt": "a red circle <lora:not-in-the-library:1>"}}
    for field, body in cases.items():
        r = requests.post(url, json={"width": 64, "height": 64, "steps": 2, **body}, auth=auth)
        assert r.status_code == 422, (field, r.text)
        detail = r.json()["detail"]
        assert isinstance(detail, list) and detail[0]["loc"] == ["body", field], (field, detail)
        assert detail[0]["msg"], field
    r = requests.post(f"{server['url']}/sdapi/v1/img2img", json={}, auth=auth)
    assert r.status_code == 422 and "img2img" in r.json()["detail"][0]["msg"]
    # harmless fields are ignored and said so
    r = requests.post(url, json={"prompt": "a red circle", "width": 64, "height": 64, "steps": 2, "seed": 1,
                                 "do_not_save_grid": True, "send_images": False}, auth=auth)
    assert r.status_code == 200 and r.json()["images"] == []
    assert "do_not_save_grid" in json.loads(r.json()["info"])["ignored"]


def test_eight_concurrent_clients_with_eight_mixes_run_batched_and_get_their_own_pictures(server):
    """Batched, each client gets exactly the pixels of its serial run (sdlora/batching.py: a grouped pass)."""
    url, auth = f"{server['url']}/sdapi/v1/txt2img", (USER, PASSWORD)
    mixes = ["", "<lora:style-a:1>", "<lora:style-b:1>", "<lora:style-a:0.5> <lora:style-b:0.5>",
             "<lora:style-a:-0.5>", "<lora:style-b:0.3:1.5>", "<lora:style-a:1.5>", "<lora:style-b:2>"]

    def body(i):
        return {"prompt": f"a blue square {mixes[i]}", "seed": 11 + i, "steps": 5, "cfg_scale": 5, "width": 64,
                "height": 64, "sampler_name": "Euler"}

    def picture(response):
        return pixels(Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]))))

    batcher = server["studio"].batcher
    serial = []
    for i in range(8):
        serial.append(picture(requests.post(url, json=body(i), auth=auth)))
    passes_before = len(batcher.passes)
    got = [None] * 8
    barrier = threading.Barrier(8)

    def client(i):
        barrier.wait()
        got[i] = picture(requests.post(url, json=body(i), auth=auth))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(8):
        assert np.array_equal(got[i], serial[i]), (
            f"client {i}: {(got[i] != serial[i]).sum()} values differ from its serial run, "
            f"max {np.abs(got[i].astype(int) - serial[i].astype(int)).max()}")
    assert len({g.tobytes() for g in got}) == 8
    concurrent_passes = batcher.passes[passes_before:]
    assert sum(concurrent_passes) == 8 and max(concurrent_passes) >= 4, concurrent_passes  # batched, not 8 passes


def test_the_pages_host_and_origin_checks_guard_the_api(server):
    url, auth = f"{server['url']}/sdapi/v1/loras", (USER, PASSWORD)
    assert requests.get(url, auth=auth, headers={"Origin": "http://evil.example"}).status_code == 403
    assert requests.get(url, auth=auth, headers={"Host": "evil.example:7861"}).status_code == 403
    assert requests.get(url, auth=auth, headers={"Origin": server["url"]}).status_code == 200


def test_interrupt_stops_the_running_pass_and_progress_shows_it(server):
    url, auth = f"{server['url']}/sdapi/v1", (USER, PASSWORD)
    answer = {}

    def long_request():
        answer["r"] = requests.post(f"{url}/txt2img", json={"prompt": "a green triangle", "seed": 1, "steps": 150,
                                                            "width": 64, "height": 64}, auth=auth)

    worker = threading.Thread(target=long_request)
    worker.start()
    for _ in range(600):  # until the pass is a few steps in
        state = requests.get(f"{url}/progress", auth=auth).json()["state"]
        if state["sampling_step"] >= 3:
            break
        threading.Event().wait(0.05)
    assert state["sampling_steps"] == 150 and state["job_count"] >= 1
    assert requests.post(f"{url}/interrupt", auth=auth).status_code == 200
    worker.join(120)
    assert answer["r"].status_code == 200 and len(answer["r"].json()["images"]) == 1
    assert server["studio"].batcher.progress.interrupted and server["studio"].batcher.last_pass_steps < 50
    assert requests.get(f"{url}/progress", auth=auth).json()["state"]["sampling_steps"] == 0  # nothing running


def test_a_full_queue_is_a_503_and_the_waiting_request_still_gets_its_picture(embedded):
    from sdlora.batching import Batcher, QueueFull
    from sdlora.generate import GenerateSettings, Item

    batcher = Batcher(embedded, window_ms=1000, max_batch=8, max_queue=1)
    settings = GenerateSettings(prompts=("a red circle",), steps=1)
    got = {}
    first = threading.Thread(target=lambda: got.setdefault("r", batcher.submit(settings, [Item("a red circle", "", 1)])))
    first.start()
    while not batcher._pending:  # the first request waits out its window
        threading.Event().wait(0.01)
    with pytest.raises(QueueFull):
        batcher.submit(settings, [Item("a blue square", "", 2)])
    first.join(60)
    assert len(got["r"]) == 1 and got["r"][0].seed == 1
