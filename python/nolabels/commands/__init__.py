"""CLI subcommands. Each module has ``register(subparsers)`` and a Python function
doing the work: ``embed.embed``, ``label.label``, ``evaluate.evaluate``, ``demo.demo``.
Module imports stay light (no torch models, no pyarrow) so ``nolabels info`` is fast.
"""
MODULES = ("embed", "label", "evaluate", "demo")


def register_all(subparsers) -> None:
    """Add every subcommand to an argparse ``subparsers`` object."""
    import importlib

    for name in MODULES:
        importlib.import_module(f"nolabels.commands.{name}").register(subparsers)
