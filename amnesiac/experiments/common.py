"""Shared machinery of the experiments: configs, data per setting, the recorded target run, method measurement."""

from __future__ import annotations

import copy
import importlib.resources
import json
import shutil
import time
from pathlib import Path

import torch

from ..baselines import METHODS, MethodResult, UnlearnTask, run_method
from ..data import DATA_ENV, DataBundle, apply_reductions, data_root, load_dataset
from ..errors import AmnesiacError
from ..evaluation import evaluate, fit_shadow_attack, json_ready, storage
from ..models import build_model, model_spec
from ..recorder import Recorder
from ..run import Run, open_run
from ..setting import TrainingSetting
from ..training import make_optimizer, train

CONFIG_PACKAGE = "amnesiac"  # the configs ship as package data: amnesiac/configs/NAME.json
CONFIG_FOLDER = "configs"

SETTING_DEFAULTS = {"dataset": "digits", "data_path": None, "data_dir": None, "download": False, "seed": 0,
                    "model": "mlp", "hidden": None, "epochs": 10, "batch_size": 64, "optimizer": "adam", "lr": 1e-3,
                    "codec": "fp32", "keep_class": None, "keep_count": 100, "train_limit": None, "test_limit": None,
                    "size": 2000}


class SkipSetting(Exception):
    """A setting that cannot run here (e.g. its data file is missing); the experiment reports it and goes on."""


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def packaged_configs() -> list[str]:
    """Names of the configs shipped in the package (``amnesiac experiment NAME`` reads ``NAME.json``)."""
    folder = importlib.resources.files(CONFIG_PACKAGE) / CONFIG_FOLDER
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


def find_config(name_or_path: str | Path) -> tuple[str, Path | None]:
    """The config's text and, for a file given by path, that path (None for a packaged config).

    ``name_or_path`` is a JSON or TOML file, or the name of a packaged config (``mnist``, ``mnist_resnet18``...).
    """
    path = Path(name_or_path)
    if path.is_file():
        return path.read_text(), path
    name = path.name.removesuffix(".json")
    packaged = importlib.resources.files(CONFIG_PACKAGE) / CONFIG_FOLDER / f"{name}.json"
    if str(name_or_path) in (name, f"{name}.json") and packaged.is_file():
        return packaged.read_text(), None
    raise AmnesiacError(f"config {name_or_path} does not exist; pass --config FILE (JSON or TOML) or the name of a "
                        f"packaged config ({', '.join(packaged_configs())})")


def read_config(path: str | Path) -> tuple[dict, Path | None]:
    """Read a JSON or TOML config file (or a packaged config, by name); returns it and its file (None when
    packaged)."""
    text, found = find_config(path)
    if found is not None and found.suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            raise AmnesiacError("TOML configs need Python 3.11+; use the JSON form") from None
        try:
            return tomllib.loads(text), found
        except tomllib.TOMLDecodeError as e:
            raise AmnesiacError(f"config {path} is not valid TOML: {e}") from None
    try:
        return json.loads(text), found
    except json.JSONDecodeError as e:
        raise AmnesiacError(f"config {path} is not valid JSON: {e}") from None


def resolve_config(cfg: dict, *, base: Path | None, smoke: bool, data_dir: str | Path | None = None) -> dict:
    """Apply the ``smoke`` overrides when asked, fill setting defaults, resolve relative data paths: against the data
    folder (``data_dir``, else ``$AMNESIAC_DATA``) when given, else against ``base`` (the folder of a config file;
    None for a packaged config, whose relative data paths then stay unresolved and their settings are skipped)."""
    cfg = deep_merge(cfg, cfg.get("smoke", {})) if smoke else copy.deepcopy(cfg)
    cfg.pop("smoke", None)
    shared = cfg.get("setting_defaults", {})
    root = data_root(data_dir)
    settings = []
    for s in cfg.get("settings", []):
        s = {**SETTING_DEFAULTS, **shared, **s}
        if s.get("data_path") and not Path(s["data_path"]).is_absolute():
            folder = root or base
            if folder is not None:
                s["data_path"] = str((folder / s["data_path"]).resolve())
        if s.get("data_dir") is None and root is not None:
            s["data_dir"] = str(root)
        settings.append(s)
    cfg["settings"] = settings
    return cfg


def setting_name(s: dict) -> str:
    return s.get("name") or f"{s['dataset']}-{s['model']}"


def load_bundle(s: dict) -> tuple[DataBundle, dict]:
    """The setting's data, reduced as it says, and the data spec stored in the run (so `amnesiac forget/eval`
    reload the same data)."""
    if s["dataset"] == "npz" and not Path(s["data_path"] or "").is_file():
        raise SkipSetting(f"data file {s['data_path']} is missing (relative data paths are found in the folder named "
                          f"by --data-dir or the {DATA_ENV} environment variable)")
    try:
        bundle = load_dataset(s["dataset"], data_dir=s["data_dir"], download=s["download"], seed=s["seed"],
                              path=s["data_path"], size=s["size"])
    except Exception as e:  # noqa: BLE001 - torchvision data without --download, for example
        raise SkipSetting(f"cannot load {s['dataset']}: {e}") from None
    spec = dict(bundle.spec)
    for key in ("train_limit", "test_limit", "keep_class", "keep_count"):
        if s.get(key) is not None and (key != "keep_count" or s.get("keep_class") is not None):
            spec[key] = s[key]
    return apply_reductions(bundle, spec), spec


def spec_of(s: dict, bundle: DataBundle) -> dict:
    options = {"hidden": list(s["hidden"])} if s.get("hidden") else {}
    return model_spec(s["model"], bundle.input_shape, bundle.num_classes, **options)


def train_target(s: dict, bundle: DataBundle, data_spec: dict, run_dir: Path, *, codec: str | None = None,
                 progress: bool = False) -> tuple[Run, float]:
    """Train the setting's model from its seed while recording every step; returns the run and the wall time."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    spec = spec_of(s, bundle)
    torch.manual_seed(s["seed"])
    model = build_model(spec)
    opt = make_optimizer(model, s["optimizer"], s["lr"])
    setting = TrainingSetting(model_spec=spec, data=data_spec, optimizer=s["optimizer"], lr=s["lr"],
                              batch_size=s["batch_size"], epochs=s["epochs"], seed=s["seed"])
    start = time.perf_counter()
    with Recorder(model, opt, run_dir, codec=codec or s["codec"], durable=False,
                  **setting.recorder_options()) as rec:
        train(model, opt, bundle.train, epochs=s["epochs"], batch_size=s["batch_size"], seed=s["seed"],
              recorder=rec, progress=progress)
    return open_run(run_dir), time.perf_counter() - start


def plain_training_seconds(s: dict, bundle: DataBundle) -> float:
    """Wall time of the same training without a Recorder (what recording costs is the difference)."""
    torch.manual_seed(s["seed"])
    model = build_model(spec_of(s, bundle))
    return train(model, make_optimizer(model, s["optimizer"], s["lr"]), bundle.train, epochs=s["epochs"],
                 batch_size=s["batch_size"], seed=s["seed"])


def shadow_attack(task: UnlearnTask, mia_cfg: dict):
    if not mia_cfg or not mia_cfg.get("shadows"):
        return None
    return fit_shadow_attack(task, shadows=int(mia_cfg["shadows"]), classifier=mia_cfg.get("classifier", "gbdt"))


def measure_methods(task: UnlearnTask, methods: dict, *, attack=None, include_original: bool = True) -> dict:
    """Run ``retrain`` first (the reference), then every other method of ``methods`` (name -> options); evaluate
    each. Returns name -> {seconds, info, metrics}; "original" is the trained model before unlearning."""
    rows: dict[str, dict] = {}
    results: dict[str, MethodResult] = {}
    order = ["retrain"] + [m for m in methods if m != "retrain"]
    for name in order:
        if name not in METHODS:
            raise AmnesiacError(f"unknown method {name!r} in the config; choose from {', '.join(METHODS)}")
        results[name] = run_method(name, task, **(methods.get(name) or {}))
    reference = results["retrain"].state
    if include_original:
        rows["original"] = {"seconds": None, "info": {},
                            "metrics": evaluate(task, task.run.final_state(), reference=reference, attack=attack)}
    for name in methods if "retrain" in methods else order:
        r = results[name]
        rows[name] = {"seconds": r.seconds, "info": json_ready(r.info),
                      "metrics": evaluate(task, r.state, reference=reference, attack=attack)}
    return rows


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(json_ready(obj), indent=1, default=str))


__all__ = ["SkipSetting", "deep_merge", "find_config", "load_bundle", "measure_methods", "packaged_configs",
           "plain_training_seconds", "read_config", "resolve_config", "setting_name", "shadow_attack", "storage",
           "train_target", "write_json"]
