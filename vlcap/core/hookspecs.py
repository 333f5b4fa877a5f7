"""The hooks a vlcap plugin implements.

A plugin is any module named in the ``vlcap`` entry-point group that implements some of these
hooks with ``@vlcap.hookimpl``. Each hook receives a ``register`` callback; call it once per
thing the plugin provides::

    import vlcap

    @vlcap.hookimpl
    def register_peft_methods(register):
        register(MyMethod())

docs/plugins.md documents every hook here with an example (a test keeps it so).
"""
import pluggy

hookspec = pluggy.HookspecMarker("vlcap")
hookimpl = pluggy.HookimplMarker("vlcap")


@hookspec
def register_connectors(register):
    """Register connectors: call ``register(connector)`` with a
    ``vlcap.core.model.connector.Connector``: how the image tokens reach the decoder."""


@hookspec
def register_peft_methods(register):
    """Register PEFT methods: call ``register(method)`` with a ``vlcap.core.model.peft.PeftMethod``."""


@hookspec
def register_decoding_strategies(register):
    """Register decoding strategies: call ``register(strategy)`` with a
    ``vlcap.core.infer.decoding.DecodingStrategy``."""


@hookspec
def register_metrics(register):
    """Register caption metrics: call ``register(metric)`` with a ``vlcap.core.eval.metrics.Metric``.
    The trainer reports every registered metric on the validation set after each epoch."""


@hookspec
def register_commands(cli):
    """Add ``vlcap`` subcommands: ``cli`` is a click group; decorate functions with
    ``@cli.command()`` (as simonw's llm does). A command named like one of vlcap's own is skipped
    with a warning; a plugin command is listed by ``vlcap list-plugins`` as kind ``command``."""
