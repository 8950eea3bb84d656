"""The FastAPI artifact cache's ``remotes.yaml`` (tests/fixtures/fastapi_remotes.yaml)
written to the daemon's config file as it is, its docker remote pointed at a
real registry: skopeo pulls the image its ``immutable_patterns`` allow, is
refused any other with 403 DENIED, and tags revalidate after its
``cache.mutable_ttl`` (shortened to one second here: the in-memory test
tests/unit/test_oci_remotes_yaml.py checks the file's 600 s with a fake clock).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest
import yaml

from tests.support.client import eventually
from tests.support.registry import ALL_MANIFEST_TYPES, Front, build_image, running_registry, skopeo

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "fastapi_remotes.yaml"
ACCEPT = {"Accept": ", ".join(ALL_MANIFEST_TYPES)}


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    work = tmp_path_factory.mktemp("oci-remotes-yaml")
    with running_registry(work) as registry:
        layout = work / "layout"
        image = build_image(layout, "one", {"v": b"one" + os.urandom(20_000)})
        registry.push(layout, "one", "library/nginx:1.27")
        registry.push(layout, "one", "library/redis:7")
        yield SimpleNamespace(registry=registry, layout=layout, image=image)


@pytest.fixture
def cache(daemon_factory: Any, front: Front) -> Any:
    remotes = yaml.safe_load(FIXTURE.read_text())["remotes"]
    remotes["dockerhub"]["base_url"] = front.url
    remotes["dockerhub"]["cache"]["mutable_ttl"] = 1
    return daemon_factory(remotes)


def test_docker_remote_allows_only_its_images_and_keeps_tags_for_mutable_ttl(
        cache: Any, front: Front, reg: SimpleNamespace, tmp_path: Path) -> None:
    base = f"docker://127.0.0.1:{cache.port}/dockerhub/library"
    skopeo("copy", "--src-tls-verify=false", f"{base}/nginx:1.27", f"oci:{tmp_path / 'nginx'}:x")
    with pytest.raises(AssertionError) as refused:
        skopeo("copy", "--src-tls-verify=false", f"{base}/redis:7", f"oci:{tmp_path / 'redis'}:x")
    assert "denied" in str(refused.value).lower(), refused.value
    direct = cache.get("/v2/dockerhub/library/redis/manifests/7", ACCEPT)
    assert direct.status == 403, direct.describe()
    assert json.loads(direct.body)["errors"][0]["code"] == "DENIED"
    assert front.count("GET", "/redis/") == 0 and front.count("HEAD", "/redis/") == 0, front.describe()

    # The tag TTL is cache.mutable_ttl: once it lapses, a HEAD upstream re-checks the tag.
    path = "/v2/dockerhub/library/nginx/manifests/1.27"
    revalidated = eventually(lambda: (r := cache.get(path, ACCEPT)).header("X-Cache") == "REVALIDATED" and r,
                             timeout=20, interval=0.2, message="the tag was never re-checked")
    assert revalidated.header("Docker-Content-Digest") == reg.image.digest
    assert front.count("HEAD", "/nginx/manifests/1.27") >= 1, front.describe()

    listed = {r["name"]: r for r in json.loads(cache.get("/").body)["remotes"]}
    assert listed["dockerhub"]["description"] == "Docker Hub, nginx images only"
