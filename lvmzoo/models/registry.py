"""Which models lvmzoo knows by name: the zoo's own, registered ones and installed plugins.

A model becomes known in one of three ways, and all three get the same treatment
(``lvmzoo fit NAME``, ``lvmzoo compare``, ``lvmzoo evaluate``, :func:`lvmzoo.load_model`):

* :func:`register_model` — a decorator (or a call) in the author's own code::

      @lvmzoo.register_model
      @dataclasses.dataclass(frozen=True)
      class PoissonMF(LatentModel):
          name: ClassVar[str] = "poisson_mf"
          ...

* the ``lvmzoo.models`` entry-point group of an installed package (as pytest's
  ``pytest11`` or flake8's plugins), in its ``pyproject.toml``::

      [project.entry-points."lvmzoo.models"]
      poisson_mf = "my_pkg.models:PoissonMF"

  Entry points are loaded the first time a name is looked up that the process
  does not know, or when every model is listed (:func:`available_models`).

* an import path, ``"package.module:Class"`` or ``"path/to/file.py:Class"``,
  wherever a model name is accepted (:func:`resolve_model`); the class is
  imported and registered.

A saved run records the class's import path and the version of the package
that holds it (:func:`model_origin`), so a new process can load it without the
author's code having run first (:func:`model_from_origin`).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import sys
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

from lvmzoo.models.base import LatentModel

ENTRY_POINT_GROUP = "lvmzoo.models"

# name -> class; the zoo's own models are added by lvmzoo.models.__init__.
MODELS: dict[str, type[LatentModel]] = {}
_entry_points_loaded = False


class ModelNotFoundError(ValueError):
    """No model of that name or import path could be found; the message says what to do."""


def register_model(cls: Optional[type] = None, *, name: Optional[str] = None,
                   overwrite: bool = False):
    """Make a model class known by its ``name`` (usable as ``@register_model`` or a call).

    Args:
      cls: a frozen dataclass subclass of :class:`~lvmzoo.models.LatentModel`.
      name: the name to register it under (default: ``cls.name``).
      overwrite: replace a different class already registered under the name;
        without it that is an error (re-registering the same class is fine, so a
        module may be imported twice).

    Returns:
      ``cls`` itself, so the decorator leaves the class unchanged.
    """
    if cls is None:
        return lambda c: register_model(c, name=name, overwrite=overwrite)
    _check_model_class(cls)
    key = name or cls.name
    if not key or key == LatentModel.name:
        raise ValueError(f"{cls.__qualname__} has no name: set the class attribute "
                         "name: ClassVar[str] = 'my_model'")
    known = MODELS.get(key)
    if known is not None and not same_model_class(known, cls) and not overwrite:
        raise ValueError(f"a model named {key!r} is already registered ({_import_path(known)}); "
                         f"choose another name for {_import_path(cls)} or pass overwrite=True")
    MODELS[key] = cls
    return cls


def _check_model_class(cls) -> None:
    if not (isinstance(cls, type) and issubclass(cls, LatentModel)):
        raise TypeError(f"{cls!r} is not a model: subclass lvmzoo.models.LatentModel")
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__qualname__} is not a dataclass: decorate it with "
                        "@dataclasses.dataclass(frozen=True) (its fields are the hyperparameters)")


def same_model_class(a: type, b: type) -> bool:
    """Whether ``a`` and ``b`` are one class, perhaps imported twice.

    A file imported both by name (``from my_fa import TinyFA``) and by path (a
    saved run of ``lvmzoo fit my_fa.py:TinyFA``) makes two class objects from the
    same source; they count as one.
    """
    if a is b:
        return True
    if a.__qualname__ != b.__qualname__:
        return False
    source = _source_file(a)
    return (source is not None and source == _source_file(b)) or _import_path(a) == _import_path(b)


def _source_file(cls: type) -> Optional[Path]:
    module = sys.modules.get(cls.__module__)
    source = getattr(module, "__lvmzoo_source__", None) or getattr(module, "__file__", None)
    return Path(source).resolve() if source else None


def available_models() -> dict[str, type[LatentModel]]:
    """Every known model: the zoo's, registered ones and installed entry points."""
    _load_entry_points()
    return dict(MODELS)


def get_model(name: str) -> type[LatentModel]:
    """The model class known as ``name`` (registered, or an installed entry point)."""
    if name not in MODELS:
        _load_entry_points()
    if name not in MODELS:
        raise ModelNotFoundError(
            f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS))}, or give the "
            "import path of your own, e.g. my_package.models:MyModel or my_models.py:MyModel")
    return MODELS[name]


def resolve_model(spec: str) -> type[LatentModel]:
    """A model class from a registered name or an import path.

    ``spec`` is a name (``"scvi"``), ``"package.module:Class"`` or
    ``"path/to/file.py:Class"``; an imported class is registered under its name.
    """
    if ":" not in spec:
        return get_model(spec)
    where, _, qualname = spec.rpartition(":")
    if not where or not qualname:
        raise ModelNotFoundError(f"{spec!r} is not an import path; write module:Class, e.g. "
                                 "my_package.models:MyModel or my_models.py:MyModel")
    module = _import_file(Path(where)) if where.endswith(".py") else _import_module(where)
    obj = module
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ModelNotFoundError(f"{where} has no {qualname!r}; check the class name in {spec!r}")
    try:
        return register_model(obj)
    except TypeError as err:
        raise ModelNotFoundError(f"{spec}: {err}") from None


def _import_module(name: str):
    # `lvmzoo fit my_models:MyModel` run from the directory holding my_models.py, as
    # `python -m` would find it (a console script's sys.path lacks the working directory).
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.append(str(Path.cwd()))
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ModelNotFoundError(
            f"cannot import module {name!r} ({err}); install the package that provides it, or "
            "run from the directory that holds it (a plain file: path/to/file.py:Class)") from None


def _import_file(path: Path):
    """Import a model file by path, once per process (its module name comes from its path)."""
    path = path.expanduser().resolve()
    if not path.is_file():
        raise ModelNotFoundError(f"model file {path} does not exist")
    module_name = f"lvmzoo_user_models.{path.stem}_{abs(hash(str(path))):x}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    # Already imported by name (`from my_fa import TinyFA` before loading a run of
    # my_fa.py:TinyFA): use that module, so the loaded model is the user's class.
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if file and file.endswith(".py") and Path(file).resolve() == path:
            return module
    # Importable by its own name (a notebook or script beside the file): import it so, and
    # the user's later `from my_fa import TinyFA` is this very class, not a twin.
    if path.stem.isidentifier() and path.stem not in sys.modules:
        try:
            found = importlib.util.find_spec(path.stem)
        except (ImportError, ValueError):
            found = None
        if found is not None and found.origin and Path(found.origin).resolve() == path:
            module = importlib.import_module(path.stem)
            module.__lvmzoo_source__ = str(path)  # saved runs still name the file
            sys.modules[module_name] = module
            return module
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    module.__lvmzoo_source__ = str(path)
    sys.modules[module_name] = module  # dataclasses look their module up while the body runs
    try:
        spec.loader.exec_module(module)
    except Exception:
        del sys.modules[module_name]
        raise
    return module


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = entry.load()
            register_model(cls, name=entry.name)
        except Exception as err:  # one broken plugin must not take the zoo down
            warnings.warn(f"lvmzoo: skipped the model entry point {entry.name!r} = "
                          f"{entry.value!r}: {err}", RuntimeWarning, stacklevel=2)


# --------------------------------------------------------------------------
# Where a class comes from, for saved runs
# --------------------------------------------------------------------------


def _import_path(cls: type) -> str:
    module = sys.modules.get(cls.__module__)
    source = getattr(module, "__lvmzoo_source__", None)
    return f"{source or cls.__module__}:{cls.__qualname__}"


def model_origin(cls: type) -> dict[str, Any]:
    """What a saved run records about a model class: its import path and package version."""
    origin: dict[str, Any] = {"model_class": _import_path(cls)}
    top = cls.__module__.split(".")[0]
    for dist in metadata.packages_distributions().get(top, [])[:1]:
        origin["model_package"] = {"name": dist, "version": metadata.version(dist)}
    return origin


def model_from_origin(name: str, origin: dict[str, Any]) -> type[LatentModel]:
    """The class of a saved run: registered under ``name``, else imported from its origin."""
    try:
        return get_model(name)
    except ModelNotFoundError:
        pass
    path = origin.get("model_class")
    if not path:
        raise ModelNotFoundError(f"the saved model {name!r} is not registered in this process "
                                 "and the run does not record where it came from; import or "
                                 "register_model its class before loading")
    try:
        return resolve_model(path)
    except (ModelNotFoundError, ImportError, SyntaxError) as err:
        package = origin.get("model_package")
        install = (f"install {package['name']}=={package['version']}" if package
                   else f"make {path.rpartition(':')[0]} importable")
        raise ModelNotFoundError(
            f"the saved model {name!r} was defined in {path} and cannot be imported here "
            f"({err}); {install}, or import / register_model the class before loading") from None
