"""Shards read from a real S3-compatible server and a real HTTP server, both on loopback.

The S3 side is moto's server (``moto[server]``, the dev extra) in a thread of the test process;
the loader reaches it through s3fs with ``AWS_ENDPOINT_URL``. The HTTP side is the standard
library's ``http.server`` in a thread, serving a directory, that can be told to fail the first N
requests for a file on purpose (a 503, or a body cut in the middle with the connection closed):
retries are tested by counting requests, never by timing. Every batch read remotely is compared
with the same batches read from the local files.
"""

from __future__ import annotations

import functools
import http.server
import importlib.util
import logging
import shutil
import threading
from pathlib import Path

import pytest
import torch
from test_peer_shards import NUM_SHARDS, PER_SHARD, make_img2dataset_dir

from conftest import make_id_shards
from pipeline.data import FetchPolicy, TrainingBatches, eval_batches, resolve_shards
from pipeline.errors import UserError, one_line
from pipeline.shard_io import opened_shards

FAST_RETRY = FetchPolicy(prefetch=1, attempts=4, backoff_s=0.01)
ID_SHARDS, ID_PER_SHARD, ID_SIZE = 6, 5, 8


def make_batches(shards, **overrides) -> TrainingBatches:
    if not hasattr(shards, "urls"):
        shards = resolve_shards(shards)
    options = dict(seed=3, rank=0, world_size=1, num_workers=0, batch_size=5, image_size=ID_SIZE,
                   channels=1, shuffle_buffer=4, random_flip=True, fetch=FAST_RETRY)
    options.update(overrides)
    return TrainingBatches(shards, **options)


def take(batches: TrainingBatches, count: int) -> list[torch.Tensor]:
    try:
        return [next(batches) for _ in range(count)]
    finally:
        batches.close()


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def id_dir(tmp_path_factory) -> Path:
    return make_id_shards(tmp_path_factory.mktemp("ids") / "train", ID_SHARDS, ID_PER_SHARD, ID_SIZE)


@pytest.fixture(scope="module")
def local_stream(id_dir) -> list[torch.Tensor]:
    """Two epochs of batches read from the local files: what every remote read must give."""
    return take(make_batches(str(id_dir)), 2 * ID_SHARDS * ID_PER_SHARD // 5)


@pytest.fixture(scope="module")
def local_stream_2_workers(id_dir) -> list[torch.Tensor]:
    return take(make_batches(str(id_dir), num_workers=2), 2 * ID_SHARDS * ID_PER_SHARD // 5)


# --- HTTP ------------------------------------------------------------------------------------------


class FaultyFiles(http.server.SimpleHTTPRequestHandler):
    """Serves a directory; ``server.faults[name]`` lists what the next requests for it get."""

    def do_GET(self):
        name = self.path.lstrip("/")
        server = self.server
        with server.lock:
            server.requests[name] = server.requests.get(name, 0) + 1
            fault = server.faults.get(name, []).pop(0) if server.faults.get(name) else None
            event = server.events.get(name)
        if event is not None:
            event.set()
        if fault == "503":
            self.send_error(503, "failing on purpose")
            return
        if fault == "cut":
            path = Path(self.translate_path(self.path))
            data = path.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture
def web(tmp_path, id_dir):
    """(server, base URL) serving a copy of the id shards (with manifest) and a bare peer dir."""
    root = tmp_path / "www"
    shutil.copytree(id_dir, root / "ids")
    make_img2dataset_dir(root / "laion")
    handler = functools.partial(FaultyFiles, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    server.lock, server.requests, server.faults, server.events = threading.Lock(), {}, {}, {}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_http_directory_with_manifest_and_brace_pattern_read_like_local_files(web, local_stream,
                                                                              local_stream_2_workers):
    server, base = web
    from_directory = resolve_shards(f"{base}/ids")
    assert from_directory.manifest is not None
    assert from_directory.urls == tuple(f"{base}/ids/shard-{i:06d}.tar" for i in range(ID_SHARDS))
    assert same(take(make_batches(from_directory), len(local_stream)), local_stream)
    pattern = f"{base}/ids/shard-{{000000..{ID_SHARDS - 1:06d}}}.tar"
    two_workers = take(make_batches(pattern, num_workers=2), len(local_stream))
    assert same(two_workers, local_stream_2_workers)


def test_http_shard_failing_twice_is_retried_then_read(web, local_stream):
    server, base = web
    name = "ids/shard-000002.tar"
    server.faults[name] = ["503", "cut"]
    batches = take(make_batches(f"{base}/ids"), len(local_stream))
    assert same(batches, local_stream)
    # two epochs: three requests the first time (two failures, one success), one the second
    assert server.requests[name] == 4


def test_http_shard_failing_every_attempt_is_one_line_naming_it(web):
    server, base = web
    name = "ids/shard-000004.tar"
    server.faults[name] = ["cut", "503", "cut", "503"]
    for workers in (0, 2):
        server.faults[name] = ["cut", "503", "cut", "503"]
        with pytest.raises(UserError) as info:
            take(make_batches(f"{base}/ids", num_workers=workers), 12)
        line = one_line(info.value)
        assert f"{base}/{name}" in line and "download failed 4 times" in line and "\n" not in line


def test_http_missing_shard_and_unlistable_directory(web):
    server, base = web
    with pytest.raises(UserError) as info:
        take(make_batches(f"{base}/ids/shard-{{000000..000006}}.tar"), 8)
    assert f"{base}/ids/shard-000006.tar does not exist" in one_line(info.value)
    assert server.requests["ids/shard-000006.tar"] == 1  # absent is final: not retried
    with pytest.raises(UserError) as info:
        resolve_shards(f"{base}/laion")
    assert "cannot be listed" in str(info.value) and "brace pattern" in str(info.value)


def test_http_bare_shards_by_pattern(web):
    server, base = web
    shards = resolve_shards(f"{base}/laion/{{00000..{NUM_SHARDS - 1:05d}}}.tar")
    batch = take(make_batches(shards, image_size=16, channels=3, batch_size=4), 1)[0]
    assert tuple(batch.shape) == (4, 3, 16, 16)


def test_next_shard_is_downloaded_while_the_current_one_is_read(web):
    server, base = web
    urls = [f"{base}/ids/shard-{i:06d}.tar" for i in range(3)]
    asked = server.events["ids/shard-000001.tar"] = threading.Event()
    shards = opened_shards(urls, FetchPolicy(prefetch=1, attempts=1))
    try:
        url, handle = next(shards)
        assert url == urls[0] and handle.read(512)  # reading shard 0 ...
        # ... shard 1 is requested without being asked for (generous bound: never a timing test)
        assert asked.wait(60)
        url, handle = next(shards)
        assert url == urls[1] and handle.read(512)
    finally:
        shards.close()


def test_eval_batches_over_http(web, id_dir):
    server, base = web
    local = list(eval_batches(resolve_shards(str(id_dir)), rank=0, world_size=1, num_workers=0,
                              batch_size=4, image_size=ID_SIZE, channels=1, max_images=11))
    remote = list(eval_batches(resolve_shards(f"{base}/ids"), rank=0, world_size=1, num_workers=0,
                               batch_size=4, image_size=ID_SIZE, channels=1, max_images=11))
    assert same(remote, local) and sum(len(b) for b in remote) == 11
    # 11 images are in 3 shards; the prefetch may have fetched the 4th, never a 5th
    assert "ids/shard-000004.tar" not in server.requests


# --- S3 (moto's server) ----------------------------------------------------------------------------


needs_s3 = pytest.mark.skipif(
    importlib.util.find_spec("moto") is None or importlib.util.find_spec("s3fs") is None
    or importlib.util.find_spec("flask") is None,
    reason='needs moto[server] and s3fs (pip install -e ".[dev]")',
)


@pytest.fixture(scope="module")
def s3(tmp_path_factory, id_dir):
    """A moto S3 server on loopback with bucket "shards": ids/ (prepared, with manifest) and
    laion/ (img2dataset layout, no manifest)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    patch = pytest.MonkeyPatch()
    for name, value in {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
                        "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        patch.setenv(name, value)
    import boto3

    client = boto3.client("s3")
    client.create_bucket(Bucket="shards")
    laion = make_img2dataset_dir(tmp_path_factory.mktemp("s3src") / "laion")
    for prefix, directory in (("ids", id_dir), ("laion", laion)):
        for path in sorted(directory.iterdir()):
            if not path.name.startswith("."):
                client.upload_file(str(path), "shards", f"{prefix}/{path.name}")
    try:
        yield client
    finally:
        import fsspec

        fsspec.AbstractFileSystem.clear_instance_cache()
        patch.undo()
        server.stop()


@needs_s3
@pytest.mark.slow
def test_s3_prepared_directory_reads_like_local_files(s3, local_stream, local_stream_2_workers):
    shards = resolve_shards("s3://shards/ids")
    assert shards.manifest is not None and shards.counts == (ID_PER_SHARD,) * ID_SHARDS
    assert shards.urls[0] == "s3://shards/ids/shard-000000.tar"
    assert same(take(make_batches(shards), len(local_stream)), local_stream)
    assert same(take(make_batches(shards, num_workers=2), len(local_stream)), local_stream_2_workers)


@needs_s3
def test_s3_bare_directory_pattern_and_glob(s3):
    bare = resolve_shards("s3://shards/laion/")
    assert bare.urls == tuple(f"s3://shards/laion/{i:05d}.tar" for i in range(NUM_SHARDS))
    assert resolve_shards("s3://shards/laion/0000[01].tar").urls == bare.urls[:2]
    assert resolve_shards("s3://shards/laion/{00000..00001}.tar").urls == bare.urls[:2]
    batch = take(make_batches(bare, image_size=16, channels=3, batch_size=4), 1)[0]
    assert tuple(batch.shape) == (4, 3, 16, 16)


@needs_s3
def test_s3_missing_shard_and_directory_are_named(s3):
    with pytest.raises(UserError) as info:
        resolve_shards("s3://shards/laion/{00000..00009}.tar")
    assert "s3://shards/laion/00004.tar does not exist" in str(info.value)
    with pytest.raises(UserError) as info:
        resolve_shards("s3://shards/nothing-here")
    assert "s3://shards/nothing-here" in str(info.value)


def test_missing_backend_names_the_package():
    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed")
    with pytest.raises(UserError) as info:
        resolve_shards("gs://bucket/shards/{0..3}.tar")
    message = str(info.value)
    assert "pip install gcsfs" in message and "data.shards" in message and "\n" not in message


def test_reshard_reads_shards_over_http(web, tmp_path):
    from data_prep.cli import main
    from pipeline.manifest import read_manifest

    server, base = web
    server.faults["laion/00001.tar"] = ["cut"]  # retried like the loader's downloads
    out = tmp_path / "out"
    assert main(["reshard", f"{base}/laion/{{00000..{NUM_SHARDS - 1:05d}}}.tar", str(out),
                 "--size", "8", "--workers", "1"]) == 0
    manifest = read_manifest(out / "train")
    assert manifest.num_samples == NUM_SHARDS * PER_SHARD and manifest.image_size == 8
    assert server.requests["laion/00001.tar"] == 2
