"""The network a classifier run trains: a registered model or timm's, a mechanism inside;
and the weights a new run may start from (``--init-from``, ``--pretrained``)."""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ...errors import UsageError

__all__ = ["build_model", "init_weights_from", "resolve_init_source"]


def _names(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


@contextlib.contextmanager
def _timm_load_log() -> Iterator[list[str]]:
    """The messages timm's pretrained loader logs (missing and unexpected keys), kept
    instead of printed."""
    logger = logging.getLogger("timm.models._builder")
    messages: list[str] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler, level, propagate = _Keep(), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


_SIZE_MISMATCH = re.compile(
    r"size mismatch for ([\w.]+): copying a param with shape torch\.Size\(\[([\d, ]*)\]\) "
    r"from checkpoint, the shape in current model is torch\.Size\(\[([\d, ]*)\]\)"
)


def _logged_keys(messages: list[str], kind: str) -> list[str]:
    """The keys of timm's ``Missing keys (a, b) ...`` / ``Unexpected keys (...)`` lines."""
    for m in messages:
        if m.startswith(f"{kind} keys ("):
            inner = m[len(kind) + 7: m.index(")")]
            return [k.strip() for k in inner.split(",") if k.strip()]
    return []


def _timm_pretrained(
    create: Callable[..., nn.Module], name: str, file: str | None, kwargs: dict[str, Any],
    log: Callable[[str], None] | None,
) -> nn.Module:
    """``timm.create_model`` from a local weights file: timm's own loader (its checkpoint
    filters, a classifier of another class count dropped), never a download."""
    if file is None:
        return create(name, pretrained=False, **kwargs)  # nothing is downloaded
    path = Path(file).expanduser()
    if not path.is_file():
        raise UsageError(f"--pretrained {file} does not exist (a local weights file for "
                         f"timm:{name}; nothing is ever downloaded)")
    # source "" and an explicit file: timm's resolver then reads the file, never a hub
    overlay = {"file": str(path.resolve()), "source": ""}
    try:
        with _timm_load_log() as messages:
            model = create(name, pretrained=True, pretrained_cfg_overlay=overlay,
                           pretrained_strict=False, **kwargs)
    except RuntimeError as exc:
        shapes = _SIZE_MISMATCH.findall(str(exc))
        if shapes:
            shown = [f"{k} (file ({a}), model ({b}))" for k, a, b in shapes]
            raise UsageError(f"--pretrained {file} does not fit timm:{name}: shape "
                             f"mismatches: {_names(shown, 4)}") from None
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"--pretrained {file}: timm could not load it ({msg})") from None
    except TypeError:
        raise  # a constructor argument timm refused: build_model says which
    except Exception as exc:  # safetensors / torch.load errors on a garbled file
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"--pretrained {file} could not be read ({type(exc).__name__}: "
                         f"{msg})") from None
    missing = _logged_keys(messages, "Missing")
    unexpected = _logged_keys(messages, "Unexpected")
    total = len(model.state_dict())
    if missing and len(missing) >= total:
        raise UsageError(f"--pretrained {file}: none of its tensors fits timm:{name} "
                         f"(unexpected keys: {_names(unexpected)})")
    if log is not None:
        log(f"--pretrained: loaded {total - len(missing)} of {total} tensors of timm:{name} "
            f"from {path}")
        if missing:
            log(f"  not in the file, left as initialised: {_names(missing)}")
        if unexpected:
            log(f"  in the file, not in the model (ignored): {_names(unexpected)}")
    return model


def build_model(
    name: str,
    num_classes: int,
    attn: str | None = None,
    img_size: int = 32,
    model_args: dict[str, Any] | None = None,
    pretrained: str | None = None,
    log: Callable[[str], None] | None = None,
) -> nn.Module:
    """A registered model (or ``timm:NAME``) for ``num_classes`` classes, ``attn`` inside.

    ``pretrained`` (``timm:`` models only) is a local weights file loaded by timm's own
    pretrained loader: its checkpoint filter runs, a classifier trained for another
    number of classes is dropped, shapes must match (a UsageError names the
    mismatches), and the keys the file lacks (say, the ``--attn`` modules) or has in
    excess are reported through ``log`` by name. Nothing is ever downloaded.
    """
    kwargs = dict(model_args or {})
    if pretrained is not None and not name.startswith("timm:"):
        raise UsageError(f"--pretrained is for timm: models; start {name} from weights "
                         "with --init-from RUN_OR_FILE")
    if name.startswith("timm:"):
        try:
            import timm
        except ImportError:
            raise UsageError(
                f"--model {name}: timm is not installed; pip install spatial-attention[timm]"
            ) from None
        except Exception as exc:  # a broken install (e.g. a mismatched torchvision)
            raise UsageError(
                f"--model {name}: timm failed to import ({type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); "
                "reinstall it with pip install spatial-attention[timm]"
            ) from None
        if attn is not None:
            # timm's ResNet family takes attn_layer through block_args (see
            # integrations/timm.py); other timm models refuse it with a TypeError.
            from ...integrations.timm import attn_layer

            block_args = dict(kwargs.pop("block_args", {}) or {})
            block_args["attn_layer"] = attn_layer(attn)
            kwargs["block_args"] = block_args
        try:
            return _timm_pretrained(timm.create_model, name[5:], pretrained,
                                    {"num_classes": num_classes, **kwargs}, log)
        except TypeError as exc:
            raise UsageError(
                f"--model {name}: timm could not build it with {sorted(kwargs)} ({exc}); "
                "--attn works with timm's ResNet family (block_args=dict(attn_layer=...))"
            ) from None
    from ...models import model_info

    try:
        builder = model_info(name).builder
    except ValueError as exc:
        raise UsageError(f"--model: {exc}") from None
    params = inspect.signature(builder).parameters
    if "img_size" in params:
        kwargs.setdefault("img_size", img_size)
    kwargs["num_classes"] = num_classes
    if attn is not None:
        kwargs["attn_layer"] = attn
    try:
        return builder(**kwargs)
    except TypeError as exc:
        raise UsageError(f"--model {name}: {exc} (check --attn / --model-arg)") from None
    except ValueError as exc:
        raise UsageError(f"--model {name}: {exc}") from None


def resolve_init_source(source: str | Path) -> Path:
    """The weights file ``--init-from`` means: a training run's EMA weights when it kept
    them, else its model weights; a run's ``checkpoint/`` directory likewise; or a
    ``.safetensors`` / torch file itself."""
    from .checkpoints import CHECKPOINT_DIR

    p = Path(source).expanduser()
    if p.is_dir():
        ckpt = p / CHECKPOINT_DIR if (p / CHECKPOINT_DIR).is_dir() else p
        for file in ("ema.safetensors", "model.safetensors"):
            if (ckpt / file).is_file():
                return ckpt / file
        raise UsageError(f"--init-from {source}: a directory without checkpoint weights "
                         f"({CHECKPOINT_DIR}/model.safetensors); expected a training run or "
                         "a weights file")
    if not p.is_file():
        raise UsageError(f"--init-from {source} does not exist")
    return p


def _tensor_dict(state: Mapping[str, Any], source: Path) -> dict[str, Tensor]:
    """The tensors of a state dict, unwrapped from a training checkpoint's container and
    with DataParallel's ``module.`` / torch.compile's ``_orig_mod.`` prefixes removed."""
    if not any(isinstance(v, Tensor) for v in state.values()):
        for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
            inner = state.get(key)
            if isinstance(inner, Mapping) and any(isinstance(v, Tensor)
                                                  for v in inner.values()):
                state = inner
                break
    out = {}
    for k, v in state.items():
        if not isinstance(v, Tensor):
            continue
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    if not out:
        raise UsageError(f"--init-from {source} holds no tensors")
    return out


def init_weights_from(model: nn.Module, source: str | Path) -> list[str]:
    """Load ``--init-from`` weights into ``model``; returns lines to report.

    Shapes are strict: any key whose shape differs is a UsageError naming every such key
    with both shapes. Keys only the model has keep their initialisation and keys only the
    file has are ignored; both are reported by name. A file sharing no key with the model
    is a UsageError.
    """
    from ...checkpoint import read_state_dict

    path = resolve_init_source(source)
    state = _tensor_dict(read_state_dict(path), path)
    expected = model.state_dict()
    common = [k for k in expected if k in state]
    if not common:
        raise UsageError(
            f"--init-from {path}: no key of it is a key of the model (file: "
            f"{_names(sorted(state), 3)}; model: {_names(list(expected), 3)})"
        )
    bad = [f"{k} (file {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
           for k in common if tuple(state[k].shape) != tuple(expected[k].shape)]
    if bad:
        raise UsageError(f"--init-from {path} does not fit the model: shape mismatches: "
                         f"{_names(bad, 4)}")
    with torch.no_grad():
        model.load_state_dict({k: state[k] for k in common}, strict=False)
    missing = [k for k in expected if k not in state]
    unexpected = sorted(k for k in state if k not in expected)
    lines = [f"--init-from: loaded {len(common)} of {len(expected)} tensors from {path}"]
    if missing:
        lines.append(f"  not in the file, left as initialised: {_names(missing)}")
    if unexpected:
        lines.append(f"  in the file, not in the model (ignored): {_names(unexpected)}")
    return lines
