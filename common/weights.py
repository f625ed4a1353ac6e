"""Weight files: find them, read them lazily, check them against the model, convert old pickles.

Every method script loads its pretrained weights the same way:

    folder = resolve("openai/clip-vit-base-patch16")     # a local folder, a .safetensors file or the HF cache
    config = load_config(folder)                         # config.json as a dict
    with torch.device("meta"):
        model = Model(config_from_hf(config))            # no memory until the weights arrive
    load_mapped(model, folder, KEY_MAP)                  # KEY_MAP: a literal dict in the method script;
                                                         # every name and shape checked, no second copy

We only ever read .safetensors: a JSON header followed by raw bytes, so reading one cannot run code and we can
memory-map it. Old .pt/.pth/.ckpt/.bin files are pickles, and unpickling a file can run any function the file
names. The converter at the bottom turns them into .safetensors once, and refuses any pickle that names
something outside a short allow-list of plain-data classes.

Command line (from the repo root):
    python -m common.weights download openai/clip-vit-base-patch16 [--revision R]
    python -m common.weights inspect PATH_OR_NAME
    python -m common.weights convert IN.pt OUT.safetensors [--key state_dict] [--prefix model.]
"""

import argparse
import contextlib
import json
import math
import os
import pathlib
import pickle
import re
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file


class WeightsError(Exception):
    """A weight file is missing, unreadable or does not fit the model. The message says what to do about it."""


# -----------------------------------------------------------------------------
# Finding the weights: a local folder, a single file, or the Hugging Face cache

# What we fetch from the Hub: configs, safetensors, tokenizer files (vocab.txt, merges.txt, tokenizer.model).
# Not the *.bin / *.pt / *.h5 copies of the same weights that many repos also carry: they would double the download.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model"]
GATED_PREFIXES = ("meta-llama/", "google/gemma", "google/medgemma")  # need an accepted licence + a token
_REPO_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")  # "gpt2" or "openai/clip-vit-base-patch16"


def hf_cache_dir():
    """The Hugging Face hub cache folder, found the way huggingface_hub itself finds it."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):  # the second is the old name, still honoured by the hub
        if os.environ.get(var):
            return Path(os.path.expandvars(os.environ[var])).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    home = os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def _cached_snapshot(repo_id, revision=None):
    """The snapshot folder of repo_id in the HF cache, or None.
    Layout: hub/models--org--name/refs/main holds a commit hash, the files are in snapshots/<hash>/."""
    repo_dir = hf_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    rev = revision or "main"
    ref = repo_dir / "refs" / rev
    commit = ref.read_text().strip() if ref.is_file() else rev  # a commit hash has no ref file, it is the folder
    snapshot = repo_dir / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


def _download_commands(repo_id, revision=None):
    """The exact shell commands that fetch repo_id into the HF cache."""
    rev = f" --revision {revision}" if revision else ""
    include = " ".join(f'"{p}"' for p in ALLOW_PATTERNS)
    return (f"    python -m common.weights download {repo_id}{rev}\n"
            f"or with the Hugging Face CLI (called huggingface-cli before huggingface_hub 1.0):\n"
            f"    hf download {repo_id}{rev} --include {include}")


def _gated_note(repo_id):
    return (f"{repo_id} is gated: open https://huggingface.co/{repo_id} while logged in and accept its licence, "
            f"then create a read token at https://huggingface.co/settings/tokens and `export HF_TOKEN=hf_...` "
            f"before downloading.")


def resolve(name_or_path, *, download=False, revision=None):
    """Turn a folder, a .safetensors file or a Hub repo id into the folder holding config.json and the weights.
    For a single file this returns its folder; if that folder holds other .safetensors files too, pass the
    file itself to read_safetensors / tensor_index. Touches the network only when download=True."""
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix != ".safetensors":
            raise WeightsError(f"{path} is not a .safetensors file. If it is a PyTorch pickle, convert it once with:\n"
                               f"    python -m common.weights convert {path} {path.with_suffix('.safetensors')}")
        return path.parent
    if path.is_dir():
        if not (any(path.glob("*.safetensors")) or (path / "config.json").is_file()):
            raise WeightsError(_describe_folder_without_weights(path))
        return path
    if not _REPO_ID.match(name) or name.endswith(".safetensors") or name.startswith((".", "~")):
        raise WeightsError(f"{name}: no such file or folder (looked relative to {Path.cwd()}).")
    snapshot = _cached_snapshot(name, revision)
    if snapshot is not None and any(snapshot.glob("*.safetensors")):
        return snapshot
    if download:
        return download_snapshot(name, revision)
    lines = [f"Could not find weights for '{name}'" + (f" at revision {revision}." if revision else "."),
             "Looked for:",
             f"  - a local file or folder '{name}' (relative to {Path.cwd()})",
             f"  - the Hugging Face cache: {hf_cache_dir() / ('models--' + name.replace('/', '--'))}"
             f"  (set HF_HUB_CACHE or HF_HOME to use another cache)"]
    if snapshot is not None:
        lines.append(f"The cache has {snapshot} but no .safetensors file in it (only .bin/.pt weights?).")
    lines += ["Download it (needs internet) with:", _download_commands(name, revision)]
    if name.startswith(GATED_PREFIXES):
        lines.append(_gated_note(name))
    raise WeightsError("\n".join(lines))


def _describe_folder_without_weights(folder):
    """Error message for a folder with neither config.json nor .safetensors: say what is there instead."""
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".pt", ".pth", ".ckpt", ".bin"))
    msg = f"{folder} holds no config.json and no .safetensors file."
    if pickles:
        msg += (f" It has PyTorch pickles ({', '.join(pickles[:5])}); convert the weights once with:\n"
                f"    python -m common.weights convert {folder / pickles[0]} {folder / 'model.safetensors'}")
    return msg


def download_snapshot(repo_id, revision=None):
    """Download the configs, safetensors and tokenizer files of repo_id into the HF cache; return the folder."""
    try:
        import huggingface_hub  # imported here: only downloading needs it (it is installed along with tokenizers)
    except ImportError:
        raise WeightsError(f"Downloading {repo_id} needs huggingface_hub: pip install huggingface_hub") from None
    try:
        folder = huggingface_hub.snapshot_download(
            repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS, cache_dir=str(hf_cache_dir()),
            token=os.environ.get("HF_TOKEN") or None)  # None: the hub falls back to the token of `hf auth login`
    except Exception as e:  # the hub's exception classes move between versions, so we sort them by name below
        raise WeightsError(_explain_download_error(repo_id, revision, e)) from None
    folder = Path(folder)
    if not any(folder.glob("*.safetensors")):
        raise WeightsError(f"{repo_id} has no .safetensors weights on the Hub (only .bin/.pt?). Download the "
                           f"pickle yourself and convert it: python -m common.weights convert IN.bin OUT.safetensors")
    return folder


def _explain_download_error(repo_id, revision, e):
    """A message for a failed snapshot_download, judged by exception class names and text (no version pinning)."""
    names = {c.__name__ for c in type(e).__mro__}
    text = f"{type(e).__name__}: {e}"
    offline = {"OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectionError", "ConnectError",
               "ConnectTimeout", "Timeout", "TimeoutError", "TimeoutException"}
    if "GatedRepoError" in names or "gated" in text.lower():
        return f"Cannot download {repo_id}: access denied.\n" + _gated_note(repo_id)
    if "RepositoryNotFoundError" in names:
        return (f"Cannot download {repo_id}: no such repo on the Hub, or it is private. Check the spelling; "
                f"for a private repo set HF_TOKEN to a token that can read it.")
    if "RevisionNotFoundError" in names:
        return f"Cannot download {repo_id}: it has no revision '{revision}' (a branch, tag or commit hash)."
    if "401" in text or "Unauthorized" in text:
        return f"Cannot download {repo_id}: the Hub rejected the token. Check HF_TOKEN (or run `hf auth login`)."
    if names & offline or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or \
            re.search(r"connect|resolve|offline|network|unreachable", text, re.IGNORECASE):
        return (f"Cannot download {repo_id}: huggingface.co is not reachable (offline, firewall, or HF_HUB_OFFLINE=1).\n"
                f"On a machine with internet run:\n{_download_commands(repo_id, revision)}\n"
                f"then copy the folder models--{repo_id.replace('/', '--')} into {hf_cache_dir()} here, "
                f"or pass the downloaded folder path instead of the name.")
    return f"Cannot download {repo_id}: {text}"


def load_config(folder):
    """config.json of a model folder (or of the folder of a .safetensors file) as a dict."""
    folder = Path(folder)
    path = (folder.parent if folder.is_file() else folder) / "config.json"
    if not path.is_file():
        raise WeightsError(f"{path} not found. The model folder needs the config.json that comes with the "
                           f"weights; download the whole repo with: python -m common.weights download ORG/NAME")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path} is not valid JSON ({e}). Download it again.") from None
    if not isinstance(config, dict):
        raise WeightsError(f"{path} should hold a JSON object, it holds a {type(config).__name__}.")
    return config


# -----------------------------------------------------------------------------
# Reading safetensors: lazily, one tensor at a time

def safetensors_files(folder):
    """The weight files of a folder: model.safetensors, or the shards listed in model.safetensors.index.json,
    or the only *.safetensors file there is. A path to a .safetensors file is returned as is."""
    folder = Path(folder)
    if folder.is_file():
        if folder.suffix != ".safetensors":
            raise WeightsError(f"{folder} is not a .safetensors file.")
        return [folder]
    if not folder.is_dir():
        raise WeightsError(f"{folder}: no such folder.")
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return _shards_from_index(index)
    files = sorted(folder.glob("*.safetensors"))
    if len(files) == 1:
        return files
    if not files:
        raise WeightsError(_describe_folder_without_weights(folder) if not (folder / "config.json").is_file()
                           else f"{folder} has a config.json but no .safetensors file: the weights are missing.")
    raise WeightsError(f"{folder} holds {len(files)} .safetensors files ({', '.join(f.name for f in files[:5])}) "
                       f"and no model.safetensors.index.json, so it is not clear which is the model. "
                       f"Pass the file itself.")


def _shards_from_index(index):
    """The shard files named in a sharded checkpoint's index, checked to all be there."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        assert isinstance(weight_map, dict) and weight_map
    except (ValueError, KeyError, TypeError, AssertionError, UnicodeDecodeError):
        raise WeightsError(f"{index} is not a valid index: expected a JSON object with a non-empty 'weight_map' "
                           f"(tensor name -> shard file). Download it again.") from None
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (index.parent / s).is_file()]
    if missing:
        raise WeightsError(f"{index} lists {len(shards)} shards but {len(missing)} are not in {index.parent}: "
                           f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}. The download was "
                           f"probably interrupted: run it again (python -m common.weights download ORG/NAME).")
    return [index.parent / s for s in shards]


def _open(path):
    """safe_open with a readable error. Opening reads the header and maps the file; no tensor bytes are read."""
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # SafetensorError's import path differs between safetensors versions
        raise WeightsError(f"{path} is not a readable safetensors file ({e}). It may be truncated: "
                           f"delete it and download or convert it again.") from None


# safetensors dtype codes of the floating point types: only these get cast. Integer and bool tensors
# (position ids, token type ids, masks) keep their type, as with transformers' torch_dtype.
_FLOAT_CODES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _key_filter(keys):
    """keys=None -> everything; a callable -> used as a predicate on names; otherwise a collection of names."""
    if keys is None:
        return lambda name: True
    if callable(keys):
        return keys
    wanted = {keys} if isinstance(keys, str) else set(keys)  # a lone string is one name, not its characters
    return wanted.__contains__


def _read_converted(path, name, dtype, device):
    """Read one tensor that must be cast or moved, through its own file handle.
    NOTE why its own handle: the pages of a memory-mapped file stay in our RSS until the mapping goes away.
    Sharing one handle for the whole file would keep every source tensor we already cast resident until the
    end of the file; with a handle per tensor, the peak is the converted tensors plus ONE source tensor."""
    with _open(path) as f:
        t = f.get_tensor(name)
    return t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else t.dtype)


def read_safetensors(folder_or_file, keys=None, dtype=None, device="cpu"):
    """Read tensors from a folder (single or sharded) or a .safetensors file into {name: tensor}.
    keys: None (all), an iterable of names, or a predicate name -> bool. dtype casts floating point tensors.
    Tensors that need no cast on CPU come back as views of the memory-mapped file (copy-on-write): no bytes
    are read until used, and load_state_dict(sd, assign=True) into a meta-device model makes no second copy."""
    want = _key_filter(keys)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype  # "bfloat16" -> torch.bfloat16
    device = torch.device(device)
    out = {}
    for path in safetensors_files(folder_or_file):
        with _open(path) as f:
            names = [k for k in f.keys() if want(k)]
            dup = [k for k in names if k in out]
            if dup:
                raise WeightsError(f"{path} repeats tensors found in another shard: {', '.join(dup[:5])}.")
            codes = {k: f.get_slice(k).get_dtype() for k in names}
            as_is = [k for k in names if device.type == "cpu" and
                     (dtype is None or codes[k] not in _FLOAT_CODES or _FLOAT_CODES[codes[k]] == dtype)]
            views = {k: f.get_tensor(k) for k in as_is}  # (shape as stored) zero-copy views of the mapped file
        for k in names:
            out[k] = views[k] if k in views else _read_converted(path, k, dtype, device)
    if keys is not None and not callable(keys):
        missing = sorted(set([keys] if isinstance(keys, str) else keys) - out.keys())
        if missing:
            raise WeightsError(f"{len(missing)} requested tensors are not in {folder_or_file}: "
                               f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
    return out


def tensor_index(folder):
    """{name: (shape tuple, safetensors dtype code such as "F32" or "BF16")} from the headers only: no data."""
    index = {}
    for path in safetensors_files(folder):
        with _open(path) as f:
            for k in f.keys():
                s = f.get_slice(k)
                index[k] = (tuple(s.get_shape()), s.get_dtype())
    return index


# -----------------------------------------------------------------------------
# Checking names and shapes against the model

def _shape(v):
    """A shape from a shape, a tensor (also on the meta device) or a tensor_index() entry."""
    if hasattr(v, "shape"):
        return tuple(v.shape)
    if isinstance(v, tuple) and len(v) == 2 and isinstance(v[1], str):
        return tuple(v[0])
    return tuple(v)


def _section(title, lines, limit):
    """A titled list of at most `limit` lines, then a count of the rest."""
    if not lines:
        return []
    more = [f"    ... and {len(lines) - limit} more"] if len(lines) > limit else []
    return [title] + [f"    {line}" for line in lines[:limit]] + more


def check_keys(expected, found, *, source="checkpoint", limit=10):
    """Raise WeightsError listing missing, unexpected and mis-shaped tensors; return None when all match.
    expected: {name: shape} of the model (after the script's key map); found: {name: shape} from the weights.
    Shapes may be tuples, torch.Size, tensors or tensor_index() entries."""
    expected = {k: _shape(v) for k, v in expected.items()}
    found = {k: _shape(v) for k, v in found.items()}
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & found.keys() if expected[k] != found[k])
    if not (missing or unexpected or wrong):
        return
    lines = [f"The {source} does not match the model: {len(missing)} missing, {len(unexpected)} unexpected, "
             f"{len(wrong)} with the wrong shape."]
    lines += _section(f"Missing (the model has them, the {source} does not):",
                      [f"{k} {expected[k]}" for k in missing], limit)
    lines += _section(f"Unexpected (in the {source}, not in the model):",
                      [f"{k} {found[k]}" for k in unexpected], limit)
    lines += _section(f"Wrong shape (name: model expects, {source} has):",
                      [f"{k}: {expected[k]} vs {found[k]}" for k in wrong], limit)
    lines.append("Names that differ by a prefix or pattern mean the key map in the method script needs fixing; "
                 "different shapes mean the model config (width, depth, patch size) does not fit these weights.")
    raise WeightsError("\n".join(lines))


# -----------------------------------------------------------------------------
# Loading through a key map: checkpoint names -> ours, every key and shape checked

def map_key(key, key_map):
    """Checkpoint key -> (our key or None, transform or None) through a template map, or False when no
    template matches. In a template "{}" stands for exactly one dotted component (a layer index, or
    weight/bias); the components a template's {} took fill the {} of its value, in order."""
    for src, dst in key_map.items():
        parts = src.split("{}")
        if len(parts) == 1:
            vals = [] if key == src else None
        else:  # match the literal pieces left to right; each {} takes exactly one dotted component
            vals, rest = [], key
            if not rest.startswith(parts[0]):
                continue
            rest = rest[len(parts[0]):]
            for lit in parts[1:]:
                cut = rest.find(".")
                cut = len(rest) if cut < 0 else cut
                if cut == 0 or not rest[cut:].startswith(lit):
                    vals = None
                    break
                vals.append(rest[:cut])
                rest = rest[cut + len(lit):]
            if vals is not None and rest:
                vals = None
        if vals is None:
            continue
        if dst is None:
            return None, None
        name, how = dst if isinstance(dst, tuple) else (dst, None)
        return name.format(*vals), how
    return False


_FUSED = {"q": ("q", "k", "v"), "k": ("q", "k", "v"), "v": ("q", "k", "v"), "kv_k": ("kv_k", "kv_v"),
          "kv_v": ("kv_k", "kv_v")}


def load_mapped(model, folder_or_file, key_map, dtype=None, drop_missing=(), source=None):
    """Load a checkpoint into `model` through a literal key map, checking every name and shape.

    key_map values: "ours.{}" (rename), ("ours.{}", "T") (transpose: Conv1D-style (in, out) -> nn.Linear),
    ("ours.{}", "q"|"k"|"v") (one third of a fused qkv, concatenated q, k, v along dim 0),
    ("ours.{}", "kv_k"|"kv_v") (one half of a fused kv), None (a key dropped on purpose).
    A checkpoint key that no template matches is an error (the model would silently miss it), and so is a
    model tensor the checkpoint lacks, unless it is named in `drop_missing` (e.g. a tied lm_head).
    The model may be built on the meta device: load_state_dict(assign=True) takes the (memory-mapped) tensors
    without a second copy. Returns the model."""
    source = source or str(folder_or_file)
    sd, found, fused = {}, {}, {}
    for k, t in read_safetensors(folder_or_file, dtype=dtype).items():
        m = map_key(k, key_map)
        if m is False:
            found[k] = tuple(t.shape)             # unknown: check_keys reports it as unexpected
            continue
        name, how = m
        if name is None:
            continue
        if how in _FUSED:
            fused.setdefault(name, {})[how] = t
        elif how == "T":
            sd[name] = t.T.contiguous()
        elif how is None:
            sd[name] = t
        else:
            raise WeightsError(f"key map entry for {k}: unknown transform {how!r}")
    for name, parts in fused.items():             # fuse only when every part is there, with matching shapes
        order = _FUSED[next(iter(parts))]
        if set(parts) != set(order) or len({p.shape[1:] for p in parts.values()}) != 1:
            raise WeightsError(f"{source}: {name} needs {', '.join(order)} with matching shapes, found "
                               f"{ {k: tuple(v.shape) for k, v in parts.items()} }")
        sd[name] = torch.cat([parts[p] for p in order], 0)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in set(drop_missing)}
    check_keys(expected, found | {k: tuple(v.shape) for k, v in sd.items()}, source=source)
    model.load_state_dict(sd, strict=False, assign=True)
    return model


# -----------------------------------------------------------------------------
# Converting PyTorch pickles (.pt .pth .ckpt .bin) to safetensors, without running code from them

def _allowed_globals():
    """The only classes and functions a checkpoint may name, as (object, name in the pickle).
    torch.load(weights_only=True) already allows tensors, dtypes, OrderedDict, set, complex and the like.
    Each entry here just rebuilds plain data; whatever is inside it goes through the same restricted unpickler."""
    nc = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray  # renamed in numpy 2
    allowed = [
        # timm saves its argparse args as "args"; Lightning hparams and many research scripts do the same.
        (argparse.Namespace, "argparse.Namespace"),
        # numpy scalars (a best metric as np.float64, a step as np.int64): a number from a dtype and raw bytes.
        # numpy 1.x pickles them as numpy.core.*, numpy 2.x as numpy._core.*.
        (nc.scalar, "numpy.core.multiarray.scalar"), (nc.scalar, "numpy._core.multiarray.scalar"),
        (np.dtype, "numpy.dtype"),
        # small numpy arrays (class weights, normalisation stats): allocate, then fill from raw bytes.
        (nc._reconstruct, "numpy.core.multiarray._reconstruct"),
        (nc._reconstruct, "numpy._core.multiarray._reconstruct"),
        (np.ndarray, "numpy.ndarray"),
        # paths in saved args (data_dir=Path(...)), rebuilt as pure paths: no file system access, and a
        # WindowsPath saved on Windows still loads here. Python 3.13 moved them to pathlib._local.
        (pathlib.PurePosixPath, "pathlib.PosixPath"), (pathlib.PurePosixPath, "pathlib._local.PosixPath"),
        (pathlib.PureWindowsPath, "pathlib.WindowsPath"), (pathlib.PureWindowsPath, "pathlib._local.WindowsPath"),
        (frozenset, "builtins.frozenset"),
    ]
    # A numpy dtype unpickles as numpy.dtype(...) and then has its state set; that second step checks the
    # dtype's own class (numpy.dtypes.Float64DType, ...), so the common ones are allowed too.
    for t in (np.bool_, np.int32, np.int64, np.float16, np.float32, np.float64):
        cls = type(np.dtype(t))
        allowed.append((cls, f"{cls.__module__}.{cls.__name__}"))
    return allowed


def _allow_list():
    """Context in which torch.load(weights_only=True) also accepts _allowed_globals()."""
    # (object, name) pairs need torch >= 2.6; older torch still loads plain state dicts, just with nothing extra.
    if tuple(int(x) for x in re.findall(r"\d+", torch.__version__)[:2]) < (2, 6):
        return contextlib.nullcontext()
    return torch.serialization.safe_globals(_allowed_globals())


def _refusal(path, offenders):
    """The message for a pickle that names something outside the allow-list."""
    return (f"{path} refers to Python objects that are not plain weights: {', '.join(sorted(set(offenders)))}.\n"
            f"A pickle can call any function it names, so this converter does not load it. If you trust the file, "
            f"convert it yourself in a trusted, throw-away environment (container or VM), e.g.:\n"
            f"    python -c \"import torch; from safetensors.torch import save_file; "
            f"ck = torch.load('{path}', map_location='cpu', weights_only=False); sd = ck.get('state_dict', ck); "
            f"save_file({{k: v.contiguous().clone() for k, v in sd.items() if isinstance(v, torch.Tensor)}}, "
            f"'model.safetensors')\"\n"
            f"and use the .safetensors file. If the name is a harmless data class, you may instead add it to "
            f"_allowed_globals() in common/weights.py after reading its code.")


def _safe_torch_load(path):
    """torch.load that never unpickles anything outside the allow-list."""
    with _allow_list():
        try:  # a static scan first: it names every offending global at once and executes nothing
            offenders = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:  # legacy (pre-zip) format, TorchScript, torch < 2.5: torch.load below still refuses
            offenders = []
        if offenders:
            raise WeightsError(_refusal(path, offenders))
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if "weights only load failed" not in str(e).lower():
                raise WeightsError(f"{path} is not a readable PyTorch checkpoint ({e}).") from None
            found = re.findall(r"GLOBAL ([\w.]+)", str(e))  # e.g. "Unsupported global: GLOBAL posix.system ..."
            raise WeightsError(_refusal(path, found or [str(e).splitlines()[-1][:200]])) from None
        except Exception as e:  # not a torch file, truncated zip, ...
            raise WeightsError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {e}).") from None


def _pick_state_dict(ckpt, key, path):
    """The dict of weights inside a checkpoint: ckpt[key], or a guess (state_dict, model, or the top level)."""
    if not isinstance(ckpt, dict):
        raise WeightsError(f"{path} holds a {type(ckpt).__name__}, not a dict of tensors.")
    if key is None:
        key = next((k for k in ("state_dict", "model") if isinstance(ckpt.get(k), dict)), None)
        if key is None and not any(isinstance(v, torch.Tensor) for v in ckpt.values()):
            raise WeightsError(f"Cannot tell which entry of {path} holds the weights; its top-level keys are: "
                               f"{', '.join(map(str, list(ckpt)[:20]))}. Pick one with --key.")
        if key is not None:
            print(f"using the weights in '{key}' (choose another entry with --key)")
    if key is None:
        return ckpt
    if key not in ckpt:
        raise WeightsError(f"{path} has no top-level key '{key}'; it has: {', '.join(map(str, list(ckpt)[:20]))}.")
    if not isinstance(ckpt[key], dict):
        raise WeightsError(f"{path}: '{key}' holds a {type(ckpt[key]).__name__}, not a dict of tensors.")
    return ckpt[key]


def _flatten(d, prefix=""):
    """Tensors of a possibly nested dict as {"a.b.c": tensor}, plus the names of the non-tensor entries."""
    tensors, dropped = {}, []
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, torch.Tensor):
            tensors[name] = v.detach()  # an nn.Parameter becomes a plain tensor
        elif isinstance(v, dict):
            sub, sub_dropped = _flatten(v, name + ".")
            tensors.update(sub)
            dropped += sub_dropped
        else:
            dropped.append(f"{name} ({type(v).__name__})")
    return tensors, dropped


def _untie(tensors):
    """Give every tensor its own contiguous memory. safetensors refuses tensors sharing storage, which
    torch.save preserves for tied weights (lm_head.weight is embed_tokens.weight) and views."""
    out, seen, tied = {}, {}, []
    for k, t in tensors.items():
        ptr = t.untyped_storage().data_ptr() if t.numel() else 0
        if ptr and ptr in seen:
            tied.append(f"{k} = {seen[ptr]}")
            t = t.clone(memory_format=torch.contiguous_format)
        elif ptr:
            seen[ptr] = k
        out[k] = t.contiguous()
    return out, tied


def _save_atomic(tensors, out, metadata):
    """Write to a temp file next to `out`, then rename: a crash never leaves a half-written out file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")  # same folder, so os.replace is a rename
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        # safetensors creates its files as 0600; give the usual umask permissions so colleagues can read it
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def convert(src, dst, *, key=None, prefix=None):
    """Convert a PyTorch checkpoint to .safetensors without running code from it. Returns the output path.
    Needs about twice the checkpoint size in RAM (the loaded pickle plus the bytes being written)."""
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise WeightsError(f"{src}: no such file.")
    if src.suffix == ".safetensors":
        raise WeightsError(f"{src} is already a .safetensors file, nothing to convert.")
    if src.suffix not in (".pt", ".pth", ".ckpt", ".bin", ".tar"):  # .tar: MoCo-style "checkpoint.pth.tar"
        raise WeightsError(f"{src}: expected a .pt, .pth, .ckpt, .bin or .pth.tar PyTorch checkpoint.")
    if dst.suffix != ".safetensors":
        raise WeightsError(f"{dst}: the output name must end in .safetensors.")
    tensors, dropped = _flatten(_pick_state_dict(_safe_torch_load(src), key, src))
    if dropped:
        print(f"dropped {len(dropped)} non-tensor entries: {', '.join(dropped[:10])}{' ...' if len(dropped) > 10 else ''}")
    if not tensors:
        raise WeightsError(f"{src} holds no tensors under the chosen entry (try another --key).")
    if prefix:
        kept = [k for k in tensors if not k.startswith(prefix)]
        renamed = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in tensors.items()}
        if len(renamed) != len(tensors):
            raise WeightsError(f"stripping '{prefix}' makes some names collide; convert without --prefix.")
        if kept:
            print(f"{len(kept)} names do not start with '{prefix}' and were kept as they are: {', '.join(kept[:5])}")
        tensors = renamed
    tensors, tied = _untie(tensors)
    if tied:
        print(f"copied {len(tied)} tensors that shared memory with another: {', '.join(tied[:5])}")
    # transformers refuses safetensors files without format metadata, so write it
    _save_atomic(tensors, dst, {"format": "pt"})
    n = sum(t.numel() for t in tensors.values())
    print(f"wrote {dst}: {len(tensors)} tensors, {n:,} parameters, {dst.stat().st_size / 2**20:.1f} MiB")
    return dst


def inspect(path):
    """Print every tensor's name, shape and dtype, then the parameter count. Reads headers only."""
    p = Path(path).expanduser()
    index = tensor_index(p if p.is_file() else resolve(path))
    if not index:
        print(f"{path}: no tensors")
        return
    width = max(len(k) for k in index)
    for k, (shape, dt) in index.items():
        print(f"{k:<{width}}  {str(list(shape)):<22} {dt}")
    n = sum(math.prod(shape) for shape, _ in index.values())
    print(f"{len(index)} tensors, {n:,} parameters ({n / 1e6:.2f} M)")


# -----------------------------------------------------------------------------

def main(argv=None):
    """Command line entry point; returns the exit code (2 with a plain message on a WeightsError)."""
    parser = argparse.ArgumentParser(prog="python -m common.weights", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    # convert
    p = sub.add_parser("convert", help="turn a .pt/.pth/.ckpt/.bin pickle into .safetensors without running its code")
    p.add_argument("input", help="the PyTorch checkpoint to read")
    p.add_argument("output", help="the .safetensors file to write")
    p.add_argument("--key", default=None, help="top-level entry holding the weights, e.g. state_dict "
                   "(Lightning, timm) or model (DeiT, MAE); default: state_dict, then model, then the top level")
    p.add_argument("--prefix", default=None, help="strip this prefix from tensor names, e.g. 'model.' "
                   "(Lightning) or 'module.' (DistributedDataParallel); default: keep names")
    # download
    p = sub.add_parser("download", help="download a Hub repo's configs, safetensors and tokenizer files")
    p.add_argument("name", help="Hub repo id, e.g. openai/clip-vit-base-patch16")
    p.add_argument("--revision", default=None, help="branch, tag or commit hash; default: main")
    # inspect
    p = sub.add_parser("inspect", help="print tensor names, shapes, dtypes and the parameter count")
    p.add_argument("path", help="a .safetensors file, a model folder or a cached Hub repo id")
    args = parser.parse_args(argv)
    try:
        if args.command == "convert":
            convert(args.input, args.output, key=args.key, prefix=args.prefix)
        elif args.command == "download":
            print(download_snapshot(args.name, args.revision))
        else:
            inspect(args.path)
    except WeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
