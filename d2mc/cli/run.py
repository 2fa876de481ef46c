"""``d2mc run``: generate text from an exported artifact with onnxruntime-genai, streamed."""

from __future__ import annotations

import click

from d2mc.errors import UserError


@click.command("run")
@click.argument("artifact", type=click.Path())
@click.argument("prompt")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--greedy", is_flag=True, help="Greedy decoding (the default unless a sampling option is given).")
@click.option("--sample", is_flag=True, help="Sample (with the defaults below unless given).")
@click.option("--temperature", type=float, help="Sampling temperature (implies sampling; default 0.7).")
@click.option("--top-p", type=float, help="Nucleus sampling mass (implies sampling; default 0.9).")
@click.option("--top-k", type=int, help="Sample among the k most likely tokens (implies sampling; default 50).")
@click.option("--seed", type=int, help="Random seed of the sampler (implies sampling; default 0).")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the tokenizer's chat template.")
def command(artifact, prompt, max_new_tokens, greedy, sample, temperature, top_p, top_k, seed, chat):
    """Generate from ARTIFACT (a d2mc export directory) given PROMPT, printing tokens as they come."""
    from d2mc.generate import stream_tokens

    sampling = [name for name, value in (("--temperature", temperature), ("--top-p", top_p), ("--top-k", top_k),
                                         ("--seed", seed)) if value is not None]
    if greedy and (sample or sampling):
        raise UserError(f"--greedy cannot be combined with {', '.join(sampling or ['--sample'])}: choose one")
    options = dict(temperature=0.7 if temperature is None else temperature, top_p=0.9 if top_p is None else top_p,
                   top_k=50 if top_k is None else top_k, seed=0 if seed is None else seed)
    for text in stream_tokens(artifact, prompt, max_new_tokens=max_new_tokens, sample=sample or bool(sampling),
                              chat=chat, **options):
        click.echo(text, nl=False)
    click.echo()
