"""CLI subcommands. Each module has ``register(subparsers)`` and a Python function
doing the work: ``embed.embed``, ``label.label``, ``evaluate.evaluate``, ``demo.demo``
(and any other module here, e.g. ``coder``). Module imports stay light (no torch
models, no pyarrow) so ``nolabels info`` is fast.
"""
import importlib
import pkgutil

#: Registered first, in this order; every other module with ``register`` follows, sorted.
MODULES = ("embed", "label", "evaluate", "demo")


def command_modules() -> list[str]:
    """Names of the subcommand modules: :data:`MODULES`, then the others found here."""
    found = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
    return [*MODULES, *(m for m in found if m not in MODULES)]


def register_all(subparsers) -> None:
    """Add every subcommand to an argparse ``subparsers`` object."""
    for name in command_modules():
        mod = importlib.import_module(f"nolabels.commands.{name}")
        if hasattr(mod, "register"):
            mod.register(subparsers)
