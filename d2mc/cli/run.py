"""``d2mc run``: generate text from an exported artifact with onnxruntime-genai, streamed."""

from __future__ import annotations

import click


@click.command("run")
@click.argument("artifact", type=click.Path())
@click.argument("prompt")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--sample", is_flag=True, help="Sample instead of greedy decoding.")
@click.option("--temperature", type=float, default=0.7, show_default=True)
@click.option("--top-p", type=float, default=0.9, show_default=True)
@click.option("--top-k", type=int, default=50, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--chat", is_flag=True, help="Wrap the prompt in the tokenizer's chat template.")
def command(artifact, prompt, max_new_tokens, sample, temperature, top_p, top_k, seed, chat):
    """Generate from ARTIFACT (a d2mc export directory) given PROMPT, printing tokens as they come."""
    from d2mc.generate import stream_tokens

    for text in stream_tokens(artifact, prompt, max_new_tokens=max_new_tokens, sample=sample,
                              temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, chat=chat):
        click.echo(text, nl=False)
    click.echo()
