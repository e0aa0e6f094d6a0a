"""Find the weights file of an open_clip ``model name + pretrained tag`` pair.

Lookup order, mirroring open_clip's own download code so that files it already cached are reused:

1. the Hugging Face hub cache (``cache_dir`` or ``$HF_HUB_CACHE``, normally
   ``~/.cache/huggingface/hub``) for the tag's ``hf_hub`` repository, safetensors first;
2. the plain-URL cache (``cache_dir`` or ``~/.cache/clip``) for tags that have a download URL, which
   is where OpenAI's ``clip`` package keeps ``ViT-B-16.pt`` and friends;
3. a download, but only after a quick reachability probe of the host (a few seconds at most).

huggingface_hub retries a failed request five times with back-off (about 25 s per file, and
open_clip asks for two files per tag), so without the probe an offline machine would wait close to
a minute before failing. When nothing is cached and the host cannot be reached, or ``HF_HUB_OFFLINE``
is set, :class:`~rfclip.errors.WeightsNotFoundError` is raised at once.
"""

from __future__ import annotations

import os
import socket
import threading
import urllib.parse
import urllib.request
from typing import Iterable

from rfclip.errors import RfclipError, WeightsNotFoundError

PROBE_TIMEOUT_S = 3.0  # per connection attempt; the whole probe is bounded by PROBE_TIMEOUT_S + 1
ETAG_TIMEOUT_S = 5.0  # timeout of the hub metadata request made once the host answered the probe

_HF_WEIGHTS = "open_clip_pytorch_model.bin"
_HF_SAFE_WEIGHTS = "open_clip_model.safetensors"


def hub_cache_dir(cache_dir: str | os.PathLike | None = None) -> str:
    """The directory huggingface_hub stores downloads in (``cache_dir`` wins when given)."""
    if cache_dir:
        return os.fspath(cache_dir)
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def url_cache_dir(cache_dir: str | os.PathLike | None = None) -> str:
    """The directory open_clip (and OpenAI's ``clip`` package) store URL downloads in."""
    return os.fspath(cache_dir) if cache_dir else os.path.expanduser("~/.cache/clip")


def hub_candidates(pcfg: dict) -> list[tuple[str, str]]:
    """(repo_id, filename) pairs open_clip would try for this pretrained config, in order."""
    hf_hub = pcfg.get("hf_hub") or ""
    if not hf_hub:
        return []
    repo_id, filename = os.path.split(hf_hub.rstrip("\n"))
    if not filename:
        return [(repo_id, _HF_SAFE_WEIGHTS), (repo_id, _HF_WEIGHTS)]
    out = []
    if filename.endswith((".bin", ".pth")):
        out.append((repo_id, filename[:-4] + ".safetensors"))
    out.append((repo_id, filename))
    return out


def offline_requested() -> bool:
    """True when the user asked huggingface_hub to stay offline (``HF_HUB_OFFLINE=1``)."""
    value = os.environ.get("HF_HUB_OFFLINE", "")
    if value.strip().upper() in {"1", "ON", "YES", "TRUE"}:
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - huggingface_hub missing or changed
        return False


def reachable(url: str, timeout: float | None = None) -> bool:
    """Can a TCP connection to ``url``'s host (or the configured proxy) be opened within ``timeout``?

    Name resolution can block far longer than a socket timeout, so the probe runs in a daemon thread
    and is abandoned after ``timeout + 1`` seconds.
    """
    timeout = PROBE_TIMEOUT_S if timeout is None else timeout
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    if not host:
        return False
    try:
        proxy = urllib.request.getproxies().get(parts.scheme)
        if proxy and not urllib.request.proxy_bypass(host):
            pp = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
            if pp.hostname:
                host, port = pp.hostname, pp.port or 8080
    except Exception:  # pragma: no cover - odd proxy settings: probe the host itself
        pass

    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, name="rfclip-net-probe", daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return bool(result and result[0])


def _probe_all(urls: list[str]) -> dict[str, bool]:
    """:func:`reachable` for several URLs at once, so the worst case stays one probe timeout."""
    results: dict[str, bool] = {}

    def run(u: str) -> None:
        results[u] = reachable(u)

    threads = [threading.Thread(target=run, args=(u,), name="rfclip-net-probe", daemon=True) for u in urls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(PROBE_TIMEOUT_S + 2.0)
    return {u: results.get(u, False) for u in urls}


def _hub_endpoint() -> str:
    try:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    except Exception:  # pragma: no cover
        endpoint = ""
    return endpoint if urllib.parse.urlsplit(endpoint).hostname else "https://huggingface.co"


def _not_found(name: str, tag: str, places: Iterable[str], reason: str) -> WeightsNotFoundError:
    where = " and ".join(places)
    return WeightsNotFoundError(
        f"weights for model {name} with pretrained tag '{tag}' are not in the local cache ({where}) "
        f"and cannot be downloaded ({reason}); run once with internet access to fill the cache, "
        f"or pass --checkpoint FILE with a local copy of the weights "
        f"(an OpenAI .pt, an open_clip checkpoint, a .safetensors file or a Hugging Face CLIP folder)"
    )


def _one_line(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def cached_hub_file(candidates: Iterable[tuple[str, str]], cache_dir: str | os.PathLike | None = None) -> str | None:
    """Path of the first (repo_id, filename) candidate already in the Hugging Face hub cache, or None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return None
    for repo_id, filename in candidates:
        try:
            hit = try_to_load_from_cache(repo_id, filename, cache_dir=hub_cache_dir(cache_dir))
        except Exception:
            hit = None
        if isinstance(hit, str) and os.path.isfile(hit):
            return hit
    return None


def cached_weights(pcfg: dict, cache_dir: str | os.PathLike | None = None) -> str | None:
    """Path of an already-downloaded weights file for this pretrained config, or None."""
    if pcfg.get("file"):
        return pcfg["file"] if os.path.isfile(pcfg["file"]) else None
    hit = cached_hub_file(hub_candidates(pcfg), cache_dir)
    if hit:
        return hit
    url = pcfg.get("url") or ""
    if url:
        target = os.path.join(url_cache_dir(cache_dir), os.path.basename(urllib.parse.urlsplit(url).path))
        if os.path.isfile(target) and os.path.getsize(target) > 0:
            return target
    return None


def resolve_pretrained(name: str, tag: str, pcfg: dict, cache_dir: str | os.PathLike | None = None) -> str:
    """Local path of the weights for ``name``/``tag``: from the cache, else downloaded.

    Raises :class:`WeightsNotFoundError` quickly when offline.
    """
    hit = cached_weights(pcfg, cache_dir)
    if hit:
        return hit

    candidates = hub_candidates(pcfg)
    url = pcfg.get("url") or ""
    places = []
    if candidates:
        places.append(hub_cache_dir(cache_dir))
    if url:
        places.append(url_cache_dir(cache_dir))
    if pcfg.get("file"):
        places.append(pcfg["file"])
    if not places:
        raise RfclipError(f"open_clip has no download location for model {name} with pretrained tag '{tag}'; "
                          f"pass --checkpoint FILE")

    if offline_requested():
        raise _not_found(name, tag, places, "HF_HUB_OFFLINE is set")

    reasons = []
    endpoint = _hub_endpoint()
    up = _probe_all(([endpoint] if candidates else []) + ([url] if url else []))
    if candidates:
        if not up[endpoint]:
            reasons.append(f"{urllib.parse.urlsplit(endpoint).hostname} is unreachable")
        else:
            from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
            from huggingface_hub.errors import HfHubHTTPError

            last: Exception | None = None
            for repo_id, filename in candidates:
                # hf_hub_download retries network errors five times with back-off (~25 s); one
                # metadata request without retries first tells a dead network from a missing file.
                try:
                    get_hf_file_metadata(hf_hub_url(repo_id, filename), timeout=ETAG_TIMEOUT_S)
                except HfHubHTTPError as e:  # the server answered: no such file (safetensors alt.), gated, ...
                    last = e
                    continue
                except Exception as e:  # connection refused / reset, timeout, TLS trouble
                    last = e
                    break
                try:
                    return hf_hub_download(repo_id, filename, cache_dir=hub_cache_dir(cache_dir),
                                           etag_timeout=ETAG_TIMEOUT_S)
                except Exception as e:
                    last = e
                    break
            reasons.append(f"download from {candidates[0][0]} failed: {_one_line(last)}")
    if url:
        if not up[url]:
            reasons.append(f"{urllib.parse.urlsplit(url).hostname} is unreachable")
        else:
            from open_clip.pretrained import download_pretrained_from_url

            old = socket.getdefaulttimeout()
            socket.setdefaulttimeout(60.0)
            try:
                return download_pretrained_from_url(url, cache_dir=url_cache_dir(cache_dir))
            except Exception as e:
                reasons.append(f"download of {url} failed: {_one_line(e)}")
            finally:
                socket.setdefaulttimeout(old)
    raise _not_found(name, tag, places, "; ".join(reasons) or "no network")
