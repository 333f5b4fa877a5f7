"""vlcap: parameter-efficient fine-tuning of ViT + GPT-2 image captioners.

PEFT methods, decoding strategies and metrics are plugins (see ``vlcap.core.hookspecs``);
the built-in ones are discovered through entry points exactly like third-party packages.
"""
from importlib.metadata import PackageNotFoundError, version

from vlcap.core.hookspecs import hookimpl

try:
    __version__ = version("vlcap")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["hookimpl", "__version__"]
