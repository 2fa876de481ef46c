"""Text generation from an exported artifact through onnxruntime-genai."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from d2mc.checks import check_number
from d2mc.errors import OptionError, UserError, require_module

MAX_SEED = 2**31 - 1


def stream_tokens(artifact, prompt: str, **options) -> Iterator[str]:
    """Yield the decoded text of each new token as it is generated (options as :func:`generate_ids`)."""
    for _token, text in generate_ids(artifact, prompt, **options):
        yield text


def generate_ids(artifact, prompt: str, *, max_new_tokens: int = 64, sample: bool = False,
                 temperature: float = 0.7, top_p: float = 0.9, top_k: int = 50, seed: int = 0,
                 chat: bool = False) -> Iterator[tuple[int, str]]:
    """Yield ``(token id, its text)`` for each new token (greedy, or sampled when ``sample``), as generated.

    Generation stops at the end of the model's context (``max_new_tokens`` is an upper bound); a prompt that
    fills the context is refused.
    """
    from d2mc.artifact import read_artifact

    check_generation_options(max_new_tokens, temperature, top_p, top_k, seed)
    if not prompt:
        raise UserError("the prompt is empty: give the text to continue")
    info = read_artifact(artifact)
    if info.get("flavour", "onnxruntime") != "onnxruntime":
        raise UserError(f"'{artifact}' is a {info['flavour']} artifact (plugin ops onnxruntime-genai cannot run): "
                        "export with --format onnxruntime to run it here")
    og = require_module("onnxruntime_genai", "d2mc run", "onnxruntime-genai")
    try:
        model = og.Model(str(artifact))
        tokenizer = og.Tokenizer(model)
    except Exception as exc:  # onnxruntime-genai raises plain RuntimeErrors for unreadable artifacts
        raise UserError(f"onnxruntime-genai cannot load '{artifact}' ({str(exc).splitlines()[0][:160]}): the "
                        "artifact is corrupt or incomplete; export it again") from None
    if chat:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(Path(artifact)))
        if not hf.chat_template:
            raise OptionError(f"the tokenizer of '{artifact}' has no chat template: drop {{chat}}")
        prompt = hf.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                        add_generation_prompt=True)
    ids = tokenizer.encode(prompt)
    context = _context_length(Path(artifact))
    if len(ids) == 0:
        raise UserError("the prompt is empty after tokenization: give the text to continue")
    if len(ids) >= context:
        raise UserError(f"the prompt is {len(ids)} tokens long and the model's context {context}: shorten the "
                        "prompt to leave room for new tokens")
    params = og.GeneratorParams(model)
    options = {"max_length": min(len(ids) + max_new_tokens, context), "do_sample": sample}
    if sample:
        options.update(temperature=temperature, top_p=top_p, top_k=top_k, random_seed=seed)
    params.set_search_options(**options)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    stream = tokenizer.create_stream()
    while not generator.is_done():
        generator.generate_next_token()
        token = int(generator.get_next_tokens()[0])
        yield token, stream.decode(token)


def check_generation_options(max_new_tokens: int, temperature: float, top_p: float, top_k: int, seed: int) -> None:
    """Refuse sampling settings outside their ranges before the artifact is loaded."""
    check_number(max_new_tokens, "--max-new-tokens", minimum=1)
    check_number(temperature, "--temperature", above=0)
    check_number(top_p, "--top-p", above=0, maximum=1)
    check_number(top_k, "--top-k", minimum=1)
    check_number(seed, "--seed", minimum=0, maximum=MAX_SEED)


def _context_length(artifact: Path) -> int:
    """The context the artifact's ``genai_config.json`` declares."""
    import json

    try:
        return int(json.loads((artifact / "genai_config.json").read_text())["model"]["context_length"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"'{artifact}/genai_config.json' does not declare the model's context_length: export the "
                        "artifact again") from None
