"""Models and datasets by Hugging Face Hub id: the one place that talks to huggingface_hub and `datasets.load_dataset`.

    from sftmix import hub
    hub.is_hub_id("HuggingFaceH4/ultrachat_200k")                  # True; "data/x.jsonl" and "./x" are not
    sha, folder = hub.resolve_revision("meta-llama/Llama-3.1-8B", "model", "main")  # commit sha + snapshot folder
    ds, source = hub.load_hub_dataset("tatsu-lab/alpaca", config=None, split="train")
    source  # {"id": "tatsu-lab/alpaca", "config": None, "split": "train", "revision": "main", "sha": "…"}

Downloads follow huggingface_hub's own settings: HF_HOME / HF_HUB_CACHE (the cache), HF_TOKEN or `hf auth login` (gated
and private repos), HF_ENDPOINT (a mirror), HF_HUB_OFFLINE=1 (cache only). A revision (branch, tag or sha; default
`main`) is first resolved to its commit sha by fetching one small file (a model's config.json, a dataset's README.md)
with `hf_hub_download`, which also writes the cache's refs, so the same id resolves offline later. Everything is then
loaded at that sha (`from_pretrained(..., revision=sha)`, `load_dataset(..., revision=sha)`), so what is recorded in
the run directory is exactly what was loaded. Loading a dataset at a sha also keeps `datasets` from asking the
dataset viewer service (another host) for its exported infos.

Errors are one line (SFTMixError) naming the id and the fix: offline and not cached (the cache folder and the
`hf download` command), gated or private (log in, accept the license), no such repo or revision, Hub unreachable.
Offline is read from the environment at call time as well as from huggingface_hub (which reads it once at import).
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from sftmix.utils import SFTMixError

# org/name, as the Hub spells ids; a data file path that looks like one (data/train.jsonl) is told apart by its suffix
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".tsv", ".txt", ".arrow", ".gz", ".zst", ".yaml", ".yml")
# small files to resolve a revision with: a model's config.json; a dataset's card, else .gitattributes (which every
# Hub repo gets in its first commit; the medalpaca sets, e.g., are one JSON file and no card)
PROBES = {"model": ("config.json",), "dataset": ("README.md", ".gitattributes"), "space": (".gitattributes",)}


def is_hub_id(spec, repo_type: str = "model") -> bool:
    """Whether `spec` reads as a Hub id (org/name) rather than a path: no leading ./ or /, not a .gguf or data file."""
    if not isinstance(spec, str) or not HUB_ID.match(spec):
        return False
    suffixes = (".gguf",) if repo_type == "model" else DATA_SUFFIXES
    return not spec.lower().endswith(suffixes)


def hub_cache_dir() -> str:
    """The huggingface_hub cache folder, read from the environment at call time (HF_HUB_CACHE, else HF_HOME/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def is_offline() -> bool:
    from huggingface_hub import constants

    env = any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE") for k in ("HF_HUB_OFFLINE",
                                                                                    "TRANSFORMERS_OFFLINE"))
    return env or constants.is_offline_mode()


def _what(repo_id: str, repo_type: str) -> str:
    return f"{repo_type if repo_type in ('dataset', 'space') else 'model'} {repo_id!r}"


def _download_cmd(repo_id: str, repo_type: str, revision: str | None) -> str:
    cmd = f"hf download {repo_id}" + (f" --repo-type {repo_type}" if repo_type in ("dataset", "space") else "")
    return cmd + (f" --revision {revision}" if revision and revision != "main" else "")


def _page(repo_id: str, repo_type: str) -> str:
    from huggingface_hub import constants

    return f"{constants.ENDPOINT}/{ {'dataset': 'datasets/', 'space': 'spaces/'}.get(repo_type, '')}{repo_id}"


@contextlib.contextmanager
def hub_errors(repo_id: str, repo_type: str = "model", revision: str | None = None):
    """Turn huggingface_hub / datasets errors about `repo_id` into one-line SFTMixErrors that say what to do."""
    from huggingface_hub import errors as e

    what = _what(repo_id, repo_type)
    login = ("log in with `hf auth login` (or set HF_TOKEN to a token with read access) and accept its license / "
             f"request access at {_page(repo_id, repo_type)}")
    try:
        yield
    except SFTMixError:
        raise
    except e.GatedRepoError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        who = "your token has not been granted access" if status == 403 else "you are not logged in"
        raise SFTMixError(f"{what} is gated and {who}: {login}.") from None
    except e.RepositoryNotFoundError:
        raise SFTMixError(f"{what} does not exist on the Hub ({_page(repo_id, repo_type)}) or is private: check the "
                          f"id, or if it is private {login.split(' and accept')[0]}.") from None
    except e.RevisionNotFoundError:
        raise SFTMixError(f"{what} has no revision {revision!r} (a branch, tag or commit sha); fix the revision "
                          f"setting.") from None
    except (e.LocalEntryNotFoundError, e.OfflineModeIsEnabled) as err:
        raise SFTMixError(_not_cached(repo_id, repo_type, revision, err)) from None
    except e.HfHubHTTPError as err:
        raise SFTMixError(f"{what}: the Hub answered {str(err).splitlines()[0]}; try again later.") from None
    except ConnectionError as err:  # datasets' "Couldn't reach ... on the Hub", an httpx connect error
        if is_offline():
            raise SFTMixError(_not_cached(repo_id, repo_type, revision, err)) from None
        raise SFTMixError(f"{what}: cannot reach the Hub ({type(err).__name__}: {str(err).splitlines()[0]}); check "
                          f"the connection (or HF_ENDPOINT), or fetch it where the Hub is reachable with "
                          f"`{_download_cmd(repo_id, repo_type, revision)}`.") from None
    except OSError as err:  # transformers wraps a failed download in "Can't load the model for ..."
        cut = _network_cause(err)
        if cut is not None:
            raise SFTMixError(f"{what}: a download from the Hub failed ({type(cut).__name__}: "
                              f"{str(cut).splitlines()[0]}); run the same command again: the files already in the "
                              f"cache ({hub_cache_dir()}) are kept and only the missing ones are fetched.") from None
        raise SFTMixError(f"{what}: {' '.join(str(err).split())[:300]}") from None
    except ValueError as err:  # transformers: "... requires you to execute the modeling code ... trust_remote_code"
        if "trust_remote_code" not in str(err):
            raise
        raise SFTMixError(f"{what} comes with its own modelling code, which transformers runs only with "
                          f"trust_remote_code: true (--trust_remote_code true); set it if you trust this "
                          f"repo.") from None


def _network_cause(err: BaseException) -> BaseException | None:
    """The transport error (connection dropped, timeout) somewhere in `err`'s cause chain, if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if type(err).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "requests", "urllib3"):
            return err
        err = err.__cause__ or err.__context__
    return None


def _not_cached(repo_id: str, repo_type: str, revision: str | None, err: Exception) -> str:
    what, cmd = _what(repo_id, repo_type), _download_cmd(repo_id, repo_type, revision)
    at = f" at revision {revision!r}" if revision and revision != "main" else ""
    if is_offline():
        return (f"{what}{at} is not in the local Hugging Face cache ({hub_cache_dir()}) and HF_HUB_OFFLINE=1 forbids "
                f"downloading it: fetch it once with `{cmd}` (with the same HF_HOME), or unset HF_HUB_OFFLINE.")
    return (f"{what}{at} is not in the local Hugging Face cache ({hub_cache_dir()}) and could not be downloaded "
            f"({' '.join(str(err).split())[:160]}); check the connection (or HF_ENDPOINT), or fetch it with `{cmd}`.")


def resolve_revision(repo_id: str, repo_type: str = "model", revision: str | None = None) -> tuple[str, str]:
    """(commit sha, snapshot folder in the cache) of `repo_id` at `revision` (default main), downloading only a probe
    file (PROBES) when online; offline, from the cache. Errors: see `hub_errors`."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    revision = revision or "main"
    cache, offline = hub_cache_dir(), is_offline()
    sha = None
    with hub_errors(repo_id, repo_type, revision):
        for probe in PROBES[repo_type]:
            try:  # hf_hub_download also writes the cache's refs/<revision>, so the id resolves offline later
                path = hf_hub_download(repo_id, probe, repo_type=repo_type, revision=revision, cache_dir=cache,
                                       local_files_only=offline)
                folder = Path(path).parent
                return folder.name, str(folder)
            except LocalEntryNotFoundError:
                if not offline:
                    raise
                sha = _cached_ref(cache, repo_id, repo_type, revision)  # cached without this probe file?
            except EntryNotFoundError:
                pass
            if sha is not None:
                break
        if sha is None and offline:
            raise LocalEntryNotFoundError(f"{repo_id}@{revision} is not cached")
        if sha is None and repo_type == "model":
            raise SFTMixError(f"model {repo_id!r} on the Hub has no config.json at revision {revision!r}, so it is "
                              f"not a transformers model; pass a transformers model id or a local .gguf file.")
        if sha is None:
            sha = HfApi().repo_info(repo_id, repo_type=repo_type, revision=revision).sha
    folder = Path(cache) / f"{repo_type}s--{repo_id.replace('/', '--')}" / "snapshots" / sha
    return sha, str(folder)


def _cached_ref(cache: str, repo_id: str, repo_type: str, revision: str) -> str | None:
    repo = Path(cache) / f"{repo_type}s--{repo_id.replace('/', '--')}"
    if re.fullmatch(r"[0-9a-f]{40}", revision) and (repo / "snapshots" / revision).is_dir():
        return revision
    ref = repo / "refs" / revision
    return ref.read_text().strip() if ref.is_file() else None


def repo_files(repo_id: str, sha: str, folder: str, repo_type: str = "model") -> list[str]:
    """The files of a repo at commit `sha`: the Hub's listing when online, else what the cache's snapshot folder
    holds (offline, what is not cached cannot be loaded either)."""
    if is_offline():
        return [p.relative_to(folder).as_posix() for p in Path(folder).rglob("*")] if Path(folder).is_dir() else []
    from huggingface_hub import HfApi

    with hub_errors(repo_id, repo_type, sha):
        return list(HfApi().list_repo_files(repo_id, repo_type=repo_type, revision=sha))


def download_file(repo_id: str, filename: str, repo_type: str = "dataset", revision: str | None = None
                  ) -> tuple[str, str]:
    """(local path, commit sha) of one file of a Hub repo (a dataset or a Space holding data files), at the resolved
    sha of `revision`; offline, from the cache. Errors: see `hub_errors`."""
    from huggingface_hub import hf_hub_download

    sha, _ = resolve_revision(repo_id, repo_type, revision)
    with hub_errors(repo_id, repo_type, revision):
        path = hf_hub_download(repo_id, filename, repo_type=repo_type, revision=sha, cache_dir=hub_cache_dir(),
                               local_files_only=is_offline())
    return path, sha


def load_hub_dataset(repo_id: str, config: str | None = None, split: str = "train", revision: str | None = None):
    """(datasets.Dataset, source record) of one split of a Hub dataset, loaded at its resolved commit sha."""
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    split = split or "train"
    sha, _ = resolve_revision(repo_id, "dataset", revision)
    where = f"{_what(repo_id, 'dataset')}" + (f" (config {config!r})" if config else "")
    with hub_errors(repo_id, "dataset", revision):
        try:
            ds = datasets.load_dataset(repo_id, name=config, split=split, revision=sha)
        except ValueError as err:  # unknown config or split: datasets lists the available ones
            raise SFTMixError(f"{where}: {' '.join(str(err).split())[:300]}; set dataset_config / "
                              f"dataset_train_split accordingly.") from None
        except DatasetNotFoundError as err:
            raise SFTMixError(f"{where}: {' '.join(str(err).split())}") from None
    source = {"id": repo_id, "config": config, "split": split, "revision": revision or "main", "sha": sha}
    return ds, source


def _is_hub(spec, repo_type: str) -> bool:
    return is_hub_id(spec, repo_type) and not os.path.exists(str(spec))


def dataset_spec(spec) -> tuple[str, str | None, str | None] | None:
    """(id, config, split) when `spec` names a Hub dataset as `ID[:CONFIG[:SPLIT]]` (an empty part: the default)
    rather than a local path (a local file of that name wins); None otherwise. The form of the evaluation sets and
    of each training data id."""
    repo_id, *rest = str(spec).split(":")
    if os.path.exists(str(spec)) or len(rest) > 2 or not is_hub_id(repo_id, "dataset"):
        return None
    return repo_id, (rest[0] or None) if rest else None, (rest[1] or None) if len(rest) > 1 else None


def run_sources(run, previous: dict | None = None) -> dict:
    """What a run's Hub ids resolve to, for DIR/sources.json, config.yaml and the report: {"models": [{role, id,
    revision, sha}], "data": [{id, config, split, revision, sha}]} (local paths and built-in specs are not listed).
    An entry of `previous` (the run directory's sources.json) with the same id, revision, config and split keeps its
    sha, so a resumed run loads exactly what it started with, even if the Hub moved on, and needs no network."""
    prev = previous or {}

    def known(kind: str, entry: dict) -> str | None:
        keys = [k for k in entry if k != "role"]
        return next((p["sha"] for p in prev.get(kind, []) if all(p.get(k) == entry[k] for k in keys)), None)

    out: dict = {"models": [], "data": []}
    models = [("model", run.model, run.model_revision)]
    if run.reference_model and run.reference_model != run.model:
        models.append(("reference_model", run.reference_model, run.reference_model_revision))
    for role, spec, revision in models:
        if _is_hub(spec, "model"):
            entry = {"role": role, "id": spec, "revision": revision or "main"}
            entry["sha"] = known("models", entry) or resolve_revision(spec, "model", revision)[0]
            out["models"].append(entry)
    for spec in run.data if isinstance(run.data, list) else [run.data]:
        parsed = dataset_spec(spec)
        if parsed:
            repo_id, config, split = parsed
            entry = {"id": repo_id, "config": config or run.dataset_config,
                     "split": split or run.dataset_train_split, "revision": "main"}
            entry["sha"] = known("data", entry) or resolve_revision(repo_id, "dataset", None)[0]
            out["data"].append(entry)
    return out


def pinned_revision(sources: dict | None, kind: str, repo_id: str) -> str | None:
    """The sha `run_sources` recorded for `repo_id` (kind: models or data), or None."""
    return next((e["sha"] for e in (sources or {}).get(kind, []) if e["id"] == repo_id), None)


def sources_comment(sources: dict | None) -> str:
    """config.yaml comment lines naming what the Hub ids resolved to (empty without Hub ids)."""
    lines = [f"#   {e['role']}: {e['id']}@{e['revision']} = {e['sha']}" for e in (sources or {}).get("models", [])]
    lines += [f"#   data: {e['id']}" + (f" config {e['config']}" if e["config"] else "") +
              f" split {e['split']}@{e['revision']} = {e['sha']}" for e in (sources or {}).get("data", [])]
    return "# Hugging Face Hub commits (also in sources.json):\n" + "\n".join(lines) + "\n" if lines else ""
