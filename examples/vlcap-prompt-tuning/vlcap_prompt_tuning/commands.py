"""``vlcap prompt-init``: the GPT-2 tokens a text-initialised prompt starts from."""
import click

from vlcap.api import Tokenizer


def register(cli):
    @cli.command("prompt-init")
    @click.argument("text")
    @click.option("--length", type=click.IntRange(min=1), default=10, show_default=True,
                  help="Prompt length (peft.options.length).")
    def prompt_init(text, length):
        """Show the tokens `--set peft.options.init=text` starts a prompt of LENGTH from."""
        tokenizer = Tokenizer()
        ids = tokenizer.encode(text)
        if not ids:
            raise click.ClickException("TEXT is empty; give the words the prompt starts from")
        ids = (ids * length)[:length]
        for position, token in enumerate(ids):
            click.echo(f"{position}\t{token}\t{tokenizer.decode([token])!r}")
